// How fast the running daemon deletes a revoked token: `token-reaper start` as a child process,
// on a fresh copy of the plain template, while other connections revoke tokens at a steady
// rate, and then all at once in one UPDATE.
//
// Latency is measured per row, on the database clock, from the revocation's commit to the row
// being gone:
// - each revocation is `WITH r AS (UPDATE … RETURNING id) INSERT INTO bench_purge.revocations
//   SELECT id, clock_timestamp() …`, so the time recorded is taken after the UPDATE, just
//   before the commit that sends the NOTIFY;
// - a statement-level AFTER DELETE trigger on the table (transition table `gone`) records the
//   ids each DELETE removed and clock_timestamp() at the end of that statement, just before it
//   commits. It is one INSERT … SELECT per DELETE, a small cost the daemon pays, so the
//   latencies here are if anything a little high.
// The daemon's own figure, `latencyMs` in `purge.batch` (the oldest row of each batch, from the
// trigger's clock_timestamp() to the end of the DELETE), is reported beside it as a cross-check.
//
// The daemon is the compiled build (daemon.ts says why). With a `source`, the copy is of a
// template without token-reaper's purge objects: `token-reaper install` makes that source's
// objects, and the daemon runs with PURGE_SOURCE set, so the same figures compare the sources.
import { setMaxListeners } from 'node:events';

import pg from 'pg';

import { waitFor, type LogLine, type ProcessHandle } from '../support/cli.js';
import { insertRandomRows, quoteTable } from '../support/fixtures.js';

import {
  daemonEnvironment,
  install,
  readPeakRss,
  sourceEnvironment,
  spawnCompiled,
  startDaemon,
  stopDaemon,
  type CompiledDaemon,
  type PurgeSource,
} from './daemon.js';
import type { BenchServer } from './databases.js';
import { checkpoint } from './scenarios.js';
import { maximum, percentile } from './statistics.js';
import type { Template } from './templates.js';
import { runPaced } from './workload.js';

/** One revoking connection per this many revocations a second. */
const REVOCATIONS_PER_CONNECTION_PER_SECOND = 250;
const MAXIMUM_REVOKING_CONNECTIONS = 32;
/** Bounds every wait for the daemon; the goals are milliseconds to seconds. */
const DAEMON_TIMEOUT_MS = 120_000;

export interface PurgePhase {
  readonly revocationsPerSecond: number;
  readonly seconds: number;
}

export interface PurgeOptions {
  readonly phases: readonly PurgePhase[];
  readonly burstRevocations: number;
  /** Extra variables for the daemon (--daemon-env). */
  readonly daemonEnvironment: Readonly<Record<string, string>>;
  /** The compiled token-reaper (daemon.ts), shared by every part of the run. */
  readonly build: CompiledDaemon;
  /**
   * null: the template as it is installed (the notify trigger), the daemon as configured.
   * A source: `install` and `start` with PURGE_SOURCE set, on a template without purge objects.
   */
  readonly source: PurgeSource | null;
  /** Prefixes the progress lines. */
  readonly label: string;
  readonly progress: (message: string) => void;
}

export interface DaemonBatches {
  readonly batches: number;
  readonly meanIdsPerBatch: number | null;
  /** The daemon's own latencyMs (the oldest row of each batch), over its batches. */
  readonly latencyP50Ms: number | null;
  readonly latencyP99Ms: number | null;
  readonly latencyMaxMs: number | null;
  /** Catch-ups run because the queue overflowed. */
  readonly queueFullCatchUps: number;
}

export interface PhaseResult {
  readonly targetRevocationsPerSecond: number;
  readonly seconds: number;
  readonly connections: number;
  readonly revocations: number;
  readonly achievedRevocationsPerSecond: number | null;
  readonly p50Ms: number | null;
  readonly p99Ms: number | null;
  readonly maxMs: number | null;
  /** Revoked rows the daemon never deleted before the wait ended: should be 0. */
  readonly notDeleted: number;
  readonly daemon: DaemonBatches;
  /** The daemon's VmHWM once this phase was over, to see which phase grows it. */
  readonly daemonPeakRssBytesAfter: number | null;
}

export interface BurstResult {
  readonly revocations: number;
  /** From the UPDATE's commit to the last of its rows gone. */
  readonly allGoneMs: number | null;
  readonly updateMs: number;
  readonly notDeleted: number;
  readonly daemon: DaemonBatches;
  readonly daemonPeakRssBytesAfter: number | null;
}

export interface PurgeResult {
  readonly phases: readonly PhaseResult[];
  readonly burst: BurstResult | null;
  /** VmHWM of the daemon process, read just before it was stopped. */
  readonly daemonPeakRssBytes: number | null;
  /** VmHWM once it had started and caught up, before any revocation: its baseline. */
  readonly daemonPeakRssBytesAtStart: number | null;
  readonly daemonExitCode: number | null;
  /** Rows deleted that nobody revoked: must be 0. */
  readonly unrevokedRowsDeleted: number;
}

export async function measurePurgeLatency(
  server: BenchServer,
  template: Template,
  options: PurgeOptions,
): Promise<PurgeResult> {
  const database = await server.createDatabase(options.label, template.database);
  const table = quoteTable(template.table);
  const pool = new pg.Pool({ connectionString: database.url, max: 2 });
  pool.on('error', () => undefined);
  let daemon: ProcessHandle | undefined;
  try {
    await prepare(pool, template);
    const needed =
      options.phases.reduce((sum, phase) => sum + phase.revocationsPerSecond * phase.seconds, 0) +
      options.burstRevocations;
    const ids = await liveIdsToRevoke(pool, template, needed);
    const environment = daemonEnvironment(database, template.table, {
      ...(options.source === null ? {} : sourceEnvironment(options.source)),
      ...options.daemonEnvironment,
    });
    if (options.source !== null) await install(options.build, environment);
    await checkpoint(server);

    options.progress(`${options.label}: starting token-reaper start`);
    if (options.source === null) {
      daemon = spawnCompiled(options.build, ['start'], environment);
      await daemon.waitForLog('listener.caught_up', DAEMON_TIMEOUT_MS);
    } else {
      // The canary's revocation is recorded like the others, so it counts as revoked.
      daemon = await startDaemon(options.build, database, table, environment, (client, id) =>
        client.query(revocationStatement(table, false), [id, 'ready']).then(() => undefined),
      );
    }
    const daemonPeakRssBytesAtStart = await readPeakRss(daemon.child.pid);

    const phases: PhaseResult[] = [];
    let next = 0;
    for (const [index, phase] of options.phases.entries()) {
      const count = phase.revocationsPerSecond * phase.seconds;
      options.progress(
        `${options.label}: ${phase.revocationsPerSecond.toLocaleString('en-US')} revocations/s for ${phase.seconds} s`,
      );
      phases.push(
        await runPhase(pool, database.url, table, daemon, {
          name: `rate-${index}`,
          phase,
          ids: ids.slice(next, next + count),
        }),
      );
      next += count;
    }

    let burst: BurstResult | null = null;
    if (options.burstRevocations > 0) {
      options.progress(
        `${options.label}: ${options.burstRevocations.toLocaleString('en-US')} revocations in one UPDATE`,
      );
      burst = await runBurst(pool, table, daemon, ids.slice(next, next + options.burstRevocations));
    }

    const daemonPeakRssBytes = await readPeakRss(daemon.child.pid);
    const daemonExitCode = await stopDaemon(daemon);
    const [unrevoked] = (
      await pool.query<{ count: number }>(
        `SELECT count(*)::int AS count FROM bench_purge.deletions AS deletion
         WHERE NOT EXISTS (SELECT 1 FROM bench_purge.revocations AS revocation
                           WHERE revocation.id = deletion.id)`,
      )
    ).rows;
    return {
      phases,
      burst,
      daemonPeakRssBytes,
      daemonPeakRssBytesAtStart,
      daemonExitCode,
      unrevokedRowsDeleted: unrevoked!.count,
    };
  } finally {
    await daemon?.kill();
    await pool.end();
    await database.drop();
  }
}

async function prepare(pool: pg.Pool, template: Template) {
  const table = quoteTable(template.table);
  // The template's revoked rows would all go in the daemon's first catch-up. That is not
  // what is measured here, so they go first, and VACUUM leaves the table as a daemon that has
  // been running for a while would keep it.
  await pool.query(`DELETE FROM ${table} WHERE revoked`);
  await pool.query(`VACUUM (ANALYZE) ${table}`);
  // Unlogged: the bookkeeping should cost the server as little as possible.
  await pool.query(`
    CREATE SCHEMA bench_purge;
    CREATE UNLOGGED TABLE bench_purge.revocations (
      id uuid PRIMARY KEY, revoked_at timestamptz NOT NULL, phase text NOT NULL);
    CREATE UNLOGGED TABLE bench_purge.deletions (id uuid NOT NULL, deleted_at timestamptz NOT NULL);
    CREATE FUNCTION bench_purge.record_deletions() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO bench_purge.deletions (id, deleted_at)
      SELECT gone.id, statement_end.at FROM gone, (SELECT clock_timestamp() AS at) AS statement_end;
      RETURN NULL;
    END
    $$;
    CREATE TRIGGER bench_purge_record_deletions AFTER DELETE ON ${table}
      REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
      EXECUTE FUNCTION bench_purge.record_deletions();
  `);
}

/** `count` live ids in random order, so revocations land all over the heap. */
async function liveIdsToRevoke(pool: pg.Pool, template: Template, count: number) {
  const table = quoteTable(template.table);
  const live = `NOT revoked AND expires_at >= now()`;
  const [available] = (
    await pool.query<{ count: number }>(`SELECT count(*)::int AS count FROM ${table} WHERE ${live}`)
  ).rows;
  // --quick's small table has fewer live tokens than the phases revoke.
  if (available!.count < count) {
    await insertRandomRows(pool, {
      table: template.table,
      kind: 'refresh_tokens',
      count: count - available!.count,
      fractions: { live: 1 },
    });
    await pool.query(`VACUUM (ANALYZE) ${table}`);
  }
  const result = await pool.query<{ id: string }>(
    `SELECT id::text AS id FROM ${table} WHERE ${live} ORDER BY random() LIMIT $1`,
    [count],
  );
  return result.rows.map((row) => row.id);
}

function revocationStatement(table: string, many: boolean) {
  return `WITH revoked AS (
            UPDATE ${table} SET revoked = true
            WHERE ${many ? 'id = ANY($1::uuid[])' : 'id = $1'} AND NOT revoked RETURNING id)
          INSERT INTO bench_purge.revocations (id, revoked_at, phase)
          SELECT id, clock_timestamp(), $2 FROM revoked`;
}

async function runPhase(
  pool: pg.Pool,
  url: string,
  table: string,
  daemon: ProcessHandle,
  { name, phase, ids }: { name: string; phase: PurgePhase; ids: readonly string[] },
): Promise<PhaseResult> {
  const connections = Math.min(
    MAXIMUM_REVOKING_CONNECTIONS,
    Math.max(2, Math.ceil(phase.revocationsPerSecond / REVOCATIONS_PER_CONNECTION_PER_SECOND)),
  );
  const clients = await Promise.all(
    Array.from({ length: connections }, async () => {
      const client = new pg.Client({
        connectionString: url,
        application_name: 'token-reaper-bench-revoker',
      });
      client.on('error', () => undefined);
      await client.connect();
      return client;
    }),
  );
  const firstLog = daemon.logs.length;
  try {
    const statement = revocationStatement(table, false);
    // The phase lasts its seconds even when the server cannot keep the rate (every NOTIFYing
    // commit in the cluster takes one lock in turn); the rate achieved is part of the result.
    const phaseOver = AbortSignal.timeout(phase.seconds * 1000);
    // Every connection waits on it at once; that is no leak.
    setMaxListeners(connections, phaseOver);
    // Client k revokes ids k, k + connections, …; together they keep the phase's rate.
    await Promise.all(
      clients.map((client, offset) => {
        const mine = ids.filter((_id, index) => index % connections === offset);
        return runPaced({
          intervalMs: (1000 * connections) / phase.revocationsPerSecond,
          count: mine.length,
          signal: phaseOver,
          step: async (index) => {
            await client.query({
              name: 'bench-revoke-one',
              text: statement,
              values: [mine[index], name],
            });
            return {};
          },
        });
      }),
    );
  } finally {
    await Promise.all(clients.map((client) => client.end().catch(() => undefined)));
  }
  await waitUntilNoRevokedRows(pool, table);

  const [row] = (
    await pool.query<{
      revocations: number;
      deleted: number;
      span_seconds: number | null;
      p50: number | null;
      p99: number | null;
      max: number | null;
    }>(
      `WITH latency AS (
         SELECT revocation.revoked_at,
                deletion.id AS deleted_id,
                extract(epoch FROM deletion.deleted_at - revocation.revoked_at)::float8 * 1000 AS ms
         FROM bench_purge.revocations AS revocation
         LEFT JOIN bench_purge.deletions AS deletion USING (id)
         WHERE revocation.phase = $1)
       SELECT count(*)::int AS revocations, count(deleted_id)::int AS deleted,
              extract(epoch FROM max(revoked_at) - min(revoked_at))::float8 AS span_seconds,
              percentile_disc(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
              percentile_disc(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
              max(ms) AS max
       FROM latency`,
      [name],
    )
  ).rows;
  return {
    targetRevocationsPerSecond: phase.revocationsPerSecond,
    seconds: phase.seconds,
    connections,
    revocations: row!.revocations,
    achievedRevocationsPerSecond:
      row!.span_seconds !== null && row!.span_seconds > 0
        ? row!.revocations / row!.span_seconds
        : null,
    p50Ms: row!.p50,
    p99Ms: row!.p99,
    maxMs: row!.max,
    notDeleted: row!.revocations - row!.deleted,
    daemon: summarizeDaemon(daemon.logs.slice(firstLog)),
    daemonPeakRssBytesAfter: await readPeakRss(daemon.child.pid),
  };
}

async function runBurst(
  pool: pg.Pool,
  table: string,
  daemon: ProcessHandle,
  ids: readonly string[],
): Promise<BurstResult> {
  const firstLog = daemon.logs.length;
  const started = performance.now();
  await pool.query(revocationStatement(table, true), [ids, 'burst']);
  const updateMs = performance.now() - started;
  await waitUntilNoRevokedRows(pool, table);
  // The UPDATE commits right after its last clock_timestamp(); its NOTIFYs go out then.
  const [row] = (
    await pool.query<{ revocations: number; deleted: number; all_gone_ms: number | null }>(
      `SELECT count(*)::int AS revocations, count(deletion.id)::int AS deleted,
              extract(epoch FROM max(deletion.deleted_at) - max(revocation.revoked_at))::float8
                * 1000 AS all_gone_ms
       FROM bench_purge.revocations AS revocation
       LEFT JOIN bench_purge.deletions AS deletion USING (id)
       WHERE revocation.phase = 'burst'`,
    )
  ).rows;
  return {
    revocations: row!.revocations,
    allGoneMs: row!.all_gone_ms,
    updateMs,
    notDeleted: row!.revocations - row!.deleted,
    daemon: summarizeDaemon(daemon.logs.slice(firstLog)),
    daemonPeakRssBytesAfter: await readPeakRss(daemon.child.pid),
  };
}

/** Polls (the partial index on revoked rows makes it cheap) until the daemon has caught up. */
async function waitUntilNoRevokedRows(pool: pg.Pool, table: string) {
  await waitFor(
    async () => {
      const result = await pool.query<{ left: boolean }>(
        `SELECT EXISTS (SELECT 1 FROM ${table} WHERE revoked) AS left`,
      );
      return !result.rows[0]!.left;
    },
    {
      timeoutMs: DAEMON_TIMEOUT_MS,
      intervalMs: 20,
      message: 'the daemon to delete every revoked token',
    },
  );
}

/**
 * The daemon's deleting rounds: a batch of ids (notify, wal), or a poll that found revoked rows
 * (poll; it logs `deleted` and no latencyMs).
 */
export const DELETE_EVENTS: ReadonlySet<string> = new Set(['purge.batch', 'purge.polled']);

function summarizeDaemon(logs: readonly LogLine[]): DaemonBatches {
  const batches = logs.filter((line) => DELETE_EVENTS.has(line.event));
  const latencies = batches
    .map((line) => line['latencyMs'])
    .filter((value): value is number => typeof value === 'number');
  const ids = batches.reduce((sum, line) => sum + Number(line['ids'] ?? line['deleted']), 0);
  return {
    batches: batches.length,
    meanIdsPerBatch: batches.length > 0 ? ids / batches.length : null,
    latencyP50Ms: percentile(latencies, 0.5),
    latencyP99Ms: percentile(latencies, 0.99),
    latencyMaxMs: maximum(latencies),
    queueFullCatchUps: logs.filter(
      (line) =>
        line.event === 'listener.caught_up' && String(line['reason']).includes('queue_full'),
    ).length,
  };
}
