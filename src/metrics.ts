// Prometheus metrics and health probes. Everything is counted from the typed events (never
// from log lines), so a library user gets the same figures as the CLI, and a log format
// change can never silently break a dashboard. Our own metrics carry the `token_reaper_`
// prefix; prom-client's default Node metrics keep their standard names (`process_*`,
// `nodejs_*`) so that the usual Node dashboards work unchanged.
//
// Readiness (decided by the daemon, see Daemon.readiness) answers "is this replica doing its
// job right now": its listener holds LISTEN, its purges and its last sweep did not fail, and
// the trigger, the rights and a writable primary are there. Liveness (Daemon.health) fails
// only when a restart could help: the listener has been down for longer than
// LISTENER_DOWN_UNHEALTHY_AFTER. Restarting a daemon whose database is briefly down would not
// bring the database back, so /healthz never queries the database itself.
//
// The server is node:http with three routes: a framework would add more code than it saves.
// It never logs requests, so nothing a client sends can reach the logs.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type {
  CatchUpEvent,
  PurgeBatchEvent,
  ReaperEvents,
  SweepRetryEvent,
  SweepThrottleEvent,
  WalSlotEvent,
} from './events.js';
import type { Logger } from './logger.js';
import type { Health, Readiness } from './daemon.js';
import type { SweepOutcome } from './sweep/sweeper.js';

/** Where a deleted row was deleted: a NOTIFY batch, a catch-up after a (re)connect, a sweep. */
export type DeletionPath = 'purge' | 'catch_up' | 'sweep';

export interface MetricsOptions {
  /** The daemon's readiness (`daemon.readiness`, `reaper.readiness`): /readyz and the listener gauge. */
  readiness: () => Readiness;
  /** The daemon's liveness (`daemon.health`, `reaper.health`): /healthz. Without it, always ok. */
  health?: () => Health;
  /** Exposed as token_reaper_build_info{version}. */
  version?: string;
  /**
   * The registry to register into; a new one by default. Pass your application's registry to
   * serve token-reaper's metrics from your own endpoint (and set defaultMetrics: false if it
   * already collects them).
   */
  registry?: Registry;
  /** prom-client's default process and Node metrics. Default true. */
  defaultMetrics?: boolean;
}

export interface Metrics {
  readonly registry: Registry;
  readiness(): Readiness;
  health(): Health;
  /** Stops counting: detaches from the events. The registry keeps its values. */
  close(): void;
}

// Prompt purge takes a millisecond or two while the listener is connected; a catch-up after
// an outage, or a delete waiting on a row lock, takes seconds.
const PURGE_LATENCY_BUCKETS = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];
// From a near-empty table (milliseconds) to 100M rows (tens of minutes).
const SWEEP_DURATION_BUCKETS = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600];

export function createMetrics(events: ReaperEvents, options: MetricsOptions): Metrics {
  const registry = options.registry ?? new Registry();
  const registers = [registry];
  if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: registry });

  const rowsDeleted = new Counter({
    name: 'token_reaper_rows_deleted_total',
    help: 'Rows deleted, by table and by path: purge (NOTIFY), catch_up (after a listener connect), sweep. Rows that went with a dropped or detached partition are not counted here.',
    labelNames: ['table', 'path'] as const,
    registers,
  });
  const purgeLatency = new Histogram({
    name: 'token_reaper_purge_latency_seconds',
    help: 'Revocation to deletion of the oldest row of each purge batch, on the database clock.',
    buckets: PURGE_LATENCY_BUCKETS,
    registers,
  });
  const sweepDuration = new Histogram({
    name: 'token_reaper_sweep_duration_seconds',
    help: 'Duration of each sweep that finished its walk, by trigger (schedule, signal, cli, api).',
    labelNames: ['trigger'] as const,
    buckets: SWEEP_DURATION_BUCKETS,
    registers,
  });
  const sweeps = new Counter({
    name: 'token_reaper_sweeps_total',
    help: 'Sweeps by trigger and status: finished, interrupted (stopped between batches), partial (ended at SWEEP_MAX_DURATION; the next resumes), skipped (another process held the sweep lock, or stopping), failed.',
    labelNames: ['trigger', 'status'] as const,
    registers,
  });
  const lastSuccessfulSweep = new Gauge({
    name: 'token_reaper_last_successful_sweep_timestamp_seconds',
    help: 'Unix time at which the last sweep finished its walk; 0 until one has.',
    registers,
  });
  const partitionsRemoved = new Counter({
    name: 'token_reaper_partitions_removed_total',
    help: 'Expired partitions removed whole by sweeps, by table and action (drop, detach).',
    labelNames: ['table', 'action'] as const,
    registers,
  });
  const catchUps = new Counter({
    name: 'token_reaper_catch_ups_total',
    help: 'Catch-ups (deletes of every revoked row after a listener connect or a lost notification), by status: finished, failed.',
    labelNames: ['status'] as const,
    registers,
  });
  const listening = () => !options.readiness().reasons.includes('listener_disconnected');
  new Gauge({
    name: 'token_reaper_listener_connected',
    help: '1 while the listener is connected with LISTEN in place, else 0.',
    registers,
    collect() {
      this.set(listening() ? 1 : 0);
    },
  });
  const reconnects = new Counter({
    name: 'token_reaper_listener_reconnects_total',
    help: 'Times the listener connected again after losing its connection.',
    registers,
  });
  const slotRetained = new Gauge({
    name: 'token_reaper_wal_slot_retained_bytes',
    help: 'PURGE_SOURCE=wal: the WAL the replication slot keeps from removal (current LSN − restart_lsn), read every 10 s by the daemon that streams from it. Alert well below max_slot_wal_keep_size.',
    labelNames: ['slot'] as const,
    registers,
  });
  const sweepThrottled = new Gauge({
    name: 'token_reaper_sweep_throttled',
    help: 'SWEEP_MAX_REPLICA_LAG: 1 while the sweep is paused because a standby or a logical slot lags more than the limit, else 0.',
    registers,
  });
  const sweepThrottledLag = new Gauge({
    name: 'token_reaper_sweep_throttled_lag_seconds',
    help: 'SWEEP_MAX_REPLICA_LAG: the lag the sweep paused for, by source (standby <name>, logical slot <name>); 0 once the pause ends.',
    labelNames: ['source'] as const,
    registers,
  });
  const sweepThrottles = new Counter({
    name: 'token_reaper_sweep_throttles_total',
    help: 'SWEEP_MAX_REPLICA_LAG: pauses of the sweep for a lagging standby or logical slot, by source.',
    labelNames: ['source'] as const,
    registers,
  });
  if (options.version !== undefined) {
    new Gauge({
      name: 'token_reaper_build_info',
      help: 'Always 1; the version running is in the label.',
      labelNames: ['version'] as const,
      registers,
    }).set({ version: options.version }, 1);
  }

  // A metrics object made after the daemon started has already missed the first connect.
  let connectedBefore = listening();

  const onPurge = (batch: PurgeBatchEvent) => {
    rowsDeleted.inc({ table: batch.table, path: 'purge' }, batch.deleted);
    if (batch.latencyMs !== null) purgeLatency.observe(batch.latencyMs / 1000);
  };
  const onCatchUp = (catchUp: CatchUpEvent) => {
    // A failed catch-up may still have deleted rows in its batches before the failure.
    rowsDeleted.inc({ table: catchUp.table, path: 'catch_up' }, catchUp.deleted);
    catchUps.inc({ status: catchUp.failed ? 'failed' : 'finished' });
  };
  // Rows a sweep left locked and its retry deleted later count as the sweep's.
  const onSweepRetry = (retry: SweepRetryEvent) => {
    for (const [table, rows] of Object.entries(retry.deleted)) {
      rowsDeleted.inc({ table, path: 'sweep' }, rows);
    }
  };
  const onSweep = (outcome: SweepOutcome) => {
    if (outcome.status !== 'finished') {
      sweeps.inc({ trigger: outcome.trigger, status: outcome.status });
      return;
    }
    // A dry run deletes nothing: it is no sweep for the counters, the histogram or the gauge.
    if (outcome.dryRun) return;
    for (const [table, result] of Object.entries(outcome.tables)) {
      rowsDeleted.inc({ table, path: 'sweep' }, result.deleted);
      const report = result.partitions;
      if (report?.partitionsDropped) {
        partitionsRemoved.inc({ table, action: 'drop' }, report.partitionsDropped);
      }
      if (report?.partitionsDetached) {
        partitionsRemoved.inc({ table, action: 'detach' }, report.partitionsDetached);
      }
    }
    if (outcome.interrupted || outcome.partial) {
      sweeps.inc({
        trigger: outcome.trigger,
        status: outcome.interrupted ? 'interrupted' : 'partial',
      });
      return;
    }
    sweeps.inc({ trigger: outcome.trigger, status: 'finished' });
    sweepDuration.observe({ trigger: outcome.trigger }, outcome.durationMs / 1000);
    lastSuccessfulSweep.set(Date.now() / 1000);
  };
  const onListener = ({ connected }: { connected: boolean }) => {
    if (!connected) return;
    if (connectedBefore) reconnects.inc();
    connectedBefore = true;
  };

  const onSweepThrottle = (throttle: SweepThrottleEvent) => {
    sweepThrottled.set(throttle.throttled ? 1 : 0);
    sweepThrottledLag.set(
      { source: throttle.source },
      throttle.throttled ? throttle.lagMs / 1000 : 0,
    );
    if (throttle.throttled) sweepThrottles.inc({ source: throttle.source });
  };

  const onWalSlot = (state: WalSlotEvent) => {
    if (state.retainedBytes !== null) slotRetained.set({ slot: state.slot }, state.retainedBytes);
  };

  events.on('purge', onPurge);
  events.on('walSlot', onWalSlot);
  events.on('catchUp', onCatchUp);
  events.on('sweep', onSweep);
  events.on('sweepRetry', onSweepRetry);
  events.on('sweepThrottle', onSweepThrottle);
  events.on('listener', onListener);

  return {
    registry,
    readiness: options.readiness,
    health: options.health ?? (() => ({ healthy: true, reasons: [] })),
    close() {
      events.off('purge', onPurge);
      events.off('walSlot', onWalSlot);
      events.off('catchUp', onCatchUp);
      events.off('sweep', onSweep);
      events.off('sweepRetry', onSweepRetry);
      events.off('sweepThrottle', onSweepThrottle);
      events.off('listener', onListener);
    },
  };
}

export interface MetricsServerOptions {
  metrics: Pick<Metrics, 'registry' | 'readiness'> & Partial<Pick<Metrics, 'health'>>;
  /** 0 picks a free port; MetricsServer.port says which. */
  port: number;
  /** Default 0.0.0.0. */
  host?: string;
  /** For `metrics.listening` and server errors; nothing is logged without one. */
  logger?: Logger;
}

export interface MetricsServer {
  readonly host: string;
  readonly port: number;
  /** Stops accepting, ends idle keep-alive connections, and resolves once closed. Idempotent. */
  close(): Promise<void>;
}

/** A scrape in flight at close gets this long to finish before its connection is cut. */
const CLOSE_GRACE_MS = 1_000;
const PROBE_PATHS = new Set(['/metrics', '/healthz', '/readyz']);

/**
 * Serves GET /metrics, /healthz and /readyz on host:port; resolves once listening, rejects
 * when it cannot listen (the port is taken, the host is not local).
 */
export async function startMetricsServer(options: MetricsServerOptions): Promise<MetricsServer> {
  const log = options.logger?.child('metrics');
  const { registry, readiness, health } = options.metrics;

  const handle = async (request: IncomingMessage, response: ServerResponse) => {
    const path = (request.url ?? '/').split('?')[0]!;
    response.setHeader('Cache-Control', 'no-store');
    if (!PROBE_PATHS.has(path)) return sendJson(response, 404, { error: 'not found' });
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      response.setHeader('Allow', 'GET, HEAD');
      return sendJson(response, 405, { error: 'method not allowed' });
    }
    if (path === '/healthz') {
      const state = health?.() ?? { healthy: true, reasons: [] };
      return state.healthy
        ? sendJson(response, 200, { status: 'ok' })
        : sendJson(response, 503, { status: 'unhealthy', reasons: state.reasons });
    }
    if (path === '/readyz') {
      const state = readiness();
      return state.ready
        ? sendJson(response, 200, { status: 'ready' })
        : sendJson(response, 503, {
            status: 'unready',
            reasons: state.reasons,
            problems: state.problems,
          });
    }
    try {
      const body = await registry.metrics();
      response.writeHead(200, { 'Content-Type': registry.contentType });
      response.end(body);
    } catch (error) {
      log?.warn('metrics.collect_failed', 'collecting the metrics failed', { error });
      sendJson(response, 500, { error: 'collecting the metrics failed' });
    }
  };

  const server = createServer(
    { headersTimeout: 5_000, requestTimeout: 10_000 },
    (request, response) => {
      void handle(request, response);
    },
  );
  const requestedHost = options.host ?? '0.0.0.0';
  await new Promise<void>((resolve, reject) => {
    const fail = (error: Error) =>
      reject(
        new Error(`cannot serve metrics on ${requestedHost}:${options.port}: ${error.message}`, {
          cause: error,
        }),
      );
    server.once('error', fail);
    server.listen(options.port, requestedHost, () => {
      server.off('error', fail);
      resolve();
    });
  });
  server.on('error', (error) => {
    log?.warn('metrics.server_error', 'the metrics server reported an error', { error });
  });

  const address = server.address() as AddressInfo;
  log?.info(
    'metrics.listening',
    `metrics and health probes on ${address.address}:${address.port}`,
    {
      host: address.address,
      port: address.port,
    },
  );

  let closing: Promise<void> | null = null;
  return {
    host: address.address,
    port: address.port,
    close: () =>
      (closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        // A scraper's keep-alive connection would otherwise hold close() open until it
        // times out.
        server.closeIdleConnections();
        setTimeout(() => server.closeAllConnections(), CLOSE_GRACE_MS).unref();
      })),
  };
}

function sendJson(response: ServerResponse, status: number, body: object) {
  response.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8' });
  response.end(`${JSON.stringify(body)}\n`);
}
