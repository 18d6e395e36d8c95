// `--only gentle` (issue 14, "the sweep is gentle by measurement"): what the sweep's pacing
// settings cost the auth service and buy it, on a table with five indexes (primary key,
// unique token_hash, the expiry and revoked indexes `install` adds, and user_id):
//
// 1. the auth-like workload's p99 at rest and during: one DELETE, the sweep at its defaults,
//    and the sweep at each SWEEP_PAUSE_RATIO of --pause-ratios. Each run is one runScenario
//    (scenarios.ts): its own copy of the table, the workload at rest, CHECKPOINT, the
//    contender with the workload beside it, the correctness check. The conditions alternate
//    run by run; medians;
// 2. every sweep's batch durations, p50 / p99 / max: sweep.finished's `batchDurationMs` when
//    the sweep reports it, else computed from its `sweep.batch` debug lines (nearest rank);
//    the JSON has both and says which the table shows;
// 3. the sweep's rows/s against the one DELETE of the same rows on a fresh copy (the first
//    condition of 1, with the same workload beside it);
// 4. on a throwaway primary with a streaming standby (test/support/cluster.ts: the machine's
//    server binaries, skipped with a note without them), the largest replay lag of a sweep of
//    the same table, without and with SWEEP_MAX_REPLICA_LAG=1s. Sampled every 100 ms on the
//    primary from pg_stat_replication (replay_lag, and pg_wal_lsn_diff(pg_current_wal_lsn(),
//    replay_lsn)), from before the sweep until the standby has replayed all of its WAL and
//    said so; and, as a cross-check that does not depend on the standby's feedback, on the
//    standby itself (pg_last_wal_replay_lsn() against the primary's position at the same tick).
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';

import pg from 'pg';

import { waitFor, type LogLine } from '../support/cli.js';
import { createCluster, serverBinaries, type Cluster } from '../support/cluster.js';
import { quoteTable } from '../support/fixtures.js';

import { provisionServer, type BenchServer } from './databases.js';
import { formatBytes, formatMs, formatNumber, formatRatio, type Goal } from './report.js';
import {
  checkpoint,
  runScenario,
  runSweepCommand,
  SCENARIOS,
  type ContenderOutcome,
  type Scenario,
  type ScenarioRun,
} from './scenarios.js';
import { maximum, median, medianOf, percentile, ratio } from './statistics.js';
import { buildTemplates, type Template, type Templates } from './templates.js';
import { WORKLOAD_HASH_PREFIX } from './workload.js';

export const PAUSE_RATIOS = [0, 1, 2, 3, 10];
export const QUICK_PAUSE_RATIOS = [0.5];

/** The issue's goals. */
const BATCH_P99_GOAL_MS = 25;
const WORKLOAD_P99_GOAL = 1.5;
const REPLAY_LAG_GOAL_MS = 2_000;
const MAX_REPLICA_LAG = '1s';

const SAMPLE_INTERVAL_MS = 100;
/** After the sweep, how long the standby gets to replay its WAL and report that it has. */
const CATCH_UP_TIMEOUT_MS = 120_000;
const USER_ID_INDEX = 'refresh_tokens_user_id_idx';
/** How long the stalled-standby conditions pause its replay, from the sweep's start. */
const STALL_MS = 3_000;

/**
 * The throwaway primary: committing as the benchmark's server does (cluster.ts starts with
 * fsync off; later settings win), and keeping enough WAL that a standby far behind never loses
 * its place. The standby flushes what it receives as a production one does.
 */
const CLUSTER_SETTINGS = [
  'fsync=on',
  'synchronous_commit=on',
  'wal_keep_size=2GB',
  'max_wal_size=1GB',
  'shared_buffers=128MB',
];
const STANDBY_SETTINGS = ['fsync=on'];

export interface GentleOptions {
  readonly rows: number;
  readonly revokedUnexpiredShare: number;
  readonly runs: number;
  readonly pauseRatios: readonly number[];
  /** More sweep conditions, each with its own variables (--gentle-variant). */
  readonly variants: readonly Readonly<Record<string, string>>[];
  readonly sweepEnvironment: Readonly<Record<string, string>>;
  readonly workloadClients: number;
  readonly workloadOperationsPerSecond: number;
  readonly atRestMs: number;
  /** --quick: leaves out the stalled-standby conditions. */
  readonly quick: boolean;
  readonly progress: (message: string) => void;
}

export interface Durations {
  readonly p50Ms: number | null;
  readonly p99Ms: number | null;
  readonly maxMs: number | null;
}

/** What one sweep's log says about its batches. */
export interface SweepFigures {
  readonly batches: number;
  /** sweep.finished's batchDurationMs (all tables), or null while the sweep does not report it. */
  readonly reported: Durations | null;
  /** The same from the sweep.batch debug lines. */
  readonly computed: Durations;
  /** reported when there, else computed: what the tables show. */
  readonly durations: Durations;
  readonly source: 'sweep.finished' | 'sweep.batch lines';
  /** Pages per batch: the first, the median and the largest (the walker adapts them). */
  readonly pages: {
    readonly first: number | null;
    readonly p50: number | null;
    readonly max: number | null;
  };
  /** The sum of the batch durations; the rest of the sweep's durationMs is between batches. */
  readonly busyMs: number;
  readonly throttled: number;
  /** The first sweep.throttled line, as logged. */
  readonly firstThrottled: LogLine | null;
  /** Each batch's pages and duration, in order, from the sweep.batch lines. */
  readonly series: { readonly pages: readonly number[]; readonly durationMs: readonly number[] };
  /** sweep.started's fields (the settings, should it log them). */
  readonly startedFields: Readonly<Record<string, unknown>>;
}

export interface GentleRun extends ScenarioRun {
  /** null for the one DELETE. */
  readonly sweep: SweepFigures | null;
}

export interface GentleCondition {
  readonly id: string;
  readonly label: string;
  readonly kind: 'delete' | 'sweep';
  /** What the sweep got on top of --sweep-env. */
  readonly environment: Readonly<Record<string, string>>;
  readonly runs: readonly GentleRun[];
  readonly errors: readonly string[];
  readonly median: {
    readonly wallMs: number | null;
    readonly rowsDeleted: number | null;
    readonly rowsPerSecond: number | null;
    /** rows/s ÷ the one DELETE's, medians of each. */
    readonly toOneDelete: number | null;
    readonly batches: number | null;
    readonly batchP50Ms: number | null;
    readonly batchP99Ms: number | null;
    readonly batchMaxMs: number | null;
    /** Share of the wall time spent outside batches (pauses, throttling, the walk's own work). */
    readonly idleShare: number | null;
    readonly walBytes: number | null;
    readonly workloadP99AtRestMs: number | null;
    readonly workloadP99DuringMs: number | null;
    /** during ÷ at rest, medians of each. */
    readonly workloadP99Ratio: number | null;
    /** during ÷ the median at-rest p99 of every run of every condition: a steadier baseline. */
    readonly workloadP99RatioToPooled: number | null;
    /** The share of the sweep's time inside batches, and of the operations that overlapped one. */
    readonly busyShare: number | null;
    readonly operationsInBatchesShare: number | null;
    /** The workload's p99 over the operations that overlapped a batch, and over the rest. */
    readonly workloadP99InBatchesMs: number | null;
    readonly workloadP99BetweenBatchesMs: number | null;
  };
}

export interface LagSample {
  /** ms since the sampling began. */
  readonly atMs: number;
  readonly replayLagMs: number | null;
  /** pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) on the primary. */
  readonly distanceBytes: number | null;
  /** The primary's position minus the standby's own pg_last_wal_replay_lsn(), same tick. */
  readonly standbyDistanceBytes: number | null;
}

export interface ReplicaRun {
  readonly run: number;
  readonly wallMs: number;
  readonly rowsDeleted: number;
  readonly walBytes: number;
  readonly sweep: SweepFigures;
  /** replay_lag before the sweep: the standby's last report, of the copy's replay. */
  readonly replayLagBeforeMs: number | null;
  /** When sweep.started came, in the samples' time. */
  readonly sweepStartedAtMs: number;
  /**
   * The largest replay_lag of pg_stat_replication from the first figure the standby reported
   * after the sweep started until it had caught up.
   */
  readonly maxReplayLagMs: number | null;
  readonly maxDistanceBytes: number | null;
  readonly maxStandbyDistanceBytes: number | null;
  /**
   * From the standby's side: at each tick, the age of the oldest WAL the standby has not
   * replayed yet (how long ago the primary first stood past the standby's position), to
   * within a tick.
   */
  readonly maxStandbyLagEstimateMs: number | null;
  /** From sweep.finished to the standby having replayed the sweep's last WAL. */
  readonly catchUpMs: number;
  readonly deadRowsLeft: number;
  readonly liveRowsDeleted: number;
  readonly samples: readonly LagSample[];
}

export interface ReplicaCondition {
  readonly id: string;
  readonly label: string;
  readonly environment: Readonly<Record<string, string>>;
  readonly runs: readonly ReplicaRun[];
  readonly errors: readonly string[];
  readonly median: {
    readonly wallMs: number | null;
    readonly rowsPerSecond: number | null;
    readonly batchP99Ms: number | null;
    readonly throttled: number | null;
    readonly maxReplayLagMs: number | null;
    readonly maxDistanceBytes: number | null;
    readonly maxStandbyLagEstimateMs: number | null;
    readonly catchUpMs: number | null;
  };
  /** The largest of any run. */
  readonly worst: {
    readonly maxReplayLagMs: number | null;
    readonly maxDistanceBytes: number | null;
    readonly maxStandbyLagEstimateMs: number | null;
  };
}

export interface ReplicaResult {
  /** Why the part did not run (no server binaries), or null. */
  readonly skipped: string | null;
  /** A crash before or between the runs, or null. */
  readonly error: string | null;
  readonly server: {
    readonly version: string;
    readonly settings: readonly string[];
    readonly standbySettings: readonly string[];
  } | null;
  readonly conditions: readonly ReplicaCondition[];
}

export interface GentleData {
  readonly rows: number;
  readonly deadRows: number;
  readonly heapPages: number;
  readonly totalBytes: number;
  readonly indexes: readonly string[];
}

/** The sweep's defaults, from src/config.ts's exports where it has them. */
export interface SweepDefaults {
  readonly pauseRatio: number | null;
  readonly batchTargetMs: number | null;
}

export interface GentleResult {
  readonly data: GentleData;
  readonly defaults: SweepDefaults;
  readonly pauseRatios: readonly number[];
  readonly conditions: readonly GentleCondition[];
  /** The smallest ratio whose workload p99 stayed ≤ 1.5 × at rest (medians), or null. */
  readonly smallestPauseRatioWithinGoal: number | null;
  /** The median at-rest p99 of every run of every condition. */
  readonly pooledAtRestP99Ms: number | null;
  readonly replica: ReplicaResult;
}

interface ConditionSpec {
  readonly id: string;
  readonly label: string;
  readonly kind: 'delete' | 'sweep';
  readonly environment: Readonly<Record<string, string>>;
}

export async function measureGentle(
  server: BenchServer,
  templates: Templates,
  options: GentleOptions,
): Promise<GentleResult> {
  const { progress } = options;
  // Read before the runs: the sweeps run the sources as they are when each starts.
  const defaults = await readDefaults();
  progress('gentle: the five-index template (the plain one plus an index on user_id)');
  const { template, indexes } = await fiveIndexTemplate(server, templates.plain);
  const data: GentleData = {
    rows: template.rows,
    deadRows: template.deadRows,
    heapPages: template.heapPages,
    totalBytes: template.totalBytes,
    indexes,
  };
  const specs: ConditionSpec[] = [
    { id: 'one-delete', label: 'one DELETE', kind: 'delete', environment: {} },
    { id: 'defaults', label: 'sweep, defaults', kind: 'sweep', environment: {} },
    ...options.pauseRatios.map((pauseRatio): ConditionSpec => ({
      id: `pause-${pauseRatio}`,
      label: `sweep, SWEEP_PAUSE_RATIO=${pauseRatio}`,
      kind: 'sweep',
      environment: { SWEEP_PAUSE_RATIO: String(pauseRatio) },
    })),
    ...options.variants.map((environment): ConditionSpec => {
      const settings = Object.entries(environment).map(([name, value]) => `${name}=${value}`);
      return {
        id: `variant-${settings.join('-')}`,
        label: `sweep, ${settings.join(', ')}`,
        kind: 'sweep',
        environment,
      };
    }),
  ];
  const runs = new Map<string, GentleRun[]>(specs.map((spec) => [spec.id, []]));
  const errors = new Map<string, string[]>(specs.map((spec) => [spec.id, []]));
  const onFiveIndexes: Templates = { ...templates, plain: template, partitioned: null };
  const naive = SCENARIOS.find((scenario) => scenario.id === 'naive')!;
  try {
    for (let run = 1; run <= options.runs; run += 1) {
      for (const spec of specs) {
        progress(`gentle run ${run}/${options.runs}: ${spec.label}`);
        try {
          let figures: SweepFigures | null = null;
          const scenario: Scenario =
            spec.kind === 'delete'
              ? naive
              : {
                  id: 'sweep',
                  label: spec.label,
                  template: 'plain',
                  run: async (context) => {
                    const record = await runSweep(context.database.url, context.template.table, {
                      ...context.sweepEnvironment,
                      ...spec.environment,
                    });
                    figures = record.figures;
                    return record.outcome;
                  },
                };
          const result = await runScenario(server, onFiveIndexes, scenario, {
            run,
            sweepEnvironment: options.sweepEnvironment,
            workloadClients: options.workloadClients,
            workloadOperationsPerSecond: options.workloadOperationsPerSecond,
            atRestMs: options.atRestMs,
          });
          const sweep = figures as SweepFigures | null;
          runs.get(spec.id)!.push({ ...result, sweep });
          progress(
            `  ${formatNumber(result.rowsDeleted, 0)} rows in ${formatMs(result.wallMs)}` +
              (sweep === null
                ? ''
                : `, ${sweep.batches} batches, p50/p99/max ${formatMs(sweep.durations.p50Ms)} / ` +
                  `${formatMs(sweep.durations.p99Ms)} / ${formatMs(sweep.durations.maxMs)}`) +
              `, workload p99 ${formatMs(result.workloadAtRest.p99Ms)} → ${formatMs(result.workloadDuring.p99Ms)}`,
          );
        } catch (error) {
          const message = error instanceof Error ? error.message : String(error);
          errors.get(spec.id)!.push(message);
          progress(`  failed: ${message.split('\n')[0]}`);
        }
      }
    }
  } finally {
    // Its copies are gone; the disk it takes is better free for the standby's cluster.
    await template.database.drop().catch(() => undefined);
  }
  const oneDelete = medianOf((runs.get('one-delete') ?? []).map((run) => run.rowsPerSecond));
  const pooledAtRest = medianOf(
    [...runs.values()].flatMap((list) => list.map((run) => run.workloadAtRest.p99Ms)),
  );
  const conditions = specs.map((spec) =>
    summarizeCondition(spec, runs.get(spec.id)!, errors.get(spec.id)!, oneDelete, pooledAtRest),
  );
  const withinGoal = conditions
    .filter((condition) => condition.environment['SWEEP_PAUSE_RATIO'] !== undefined)
    .filter(
      (condition) =>
        condition.median.workloadP99Ratio !== null &&
        condition.median.workloadP99Ratio <= WORKLOAD_P99_GOAL,
    )
    .map((condition) => Number(condition.environment['SWEEP_PAUSE_RATIO']));

  const replica = await measureReplicaLag(options);
  return {
    data,
    defaults,
    pauseRatios: options.pauseRatios,
    conditions,
    smallestPauseRatioWithinGoal: withinGoal.length > 0 ? Math.min(...withinGoal) : null,
    pooledAtRestP99Ms: pooledAtRest,
    replica,
  };
}

/** Looked up at run time, so the benchmark runs on code that names them differently, or not. */
async function readDefaults(): Promise<SweepDefaults> {
  const config = (await import('../../src/config.js').catch(() => ({}))) as Record<string, unknown>;
  const number = (name: string) => (typeof config[name] === 'number' ? config[name] : null);
  return {
    pauseRatio: number('DEFAULT_PAUSE_RATIO'),
    batchTargetMs: number('DEFAULT_BATCH_TARGET_MS'),
  };
}

/**
 * A copy of the plain template with a fifth index, on user_id (an auth service lists and
 * revokes a user's tokens by it), frozen like the others.
 */
async function fiveIndexTemplate(
  server: BenchServer,
  plain: Template,
): Promise<{ template: Template; indexes: string[] }> {
  const database = await server.createDatabase('template_gentle', plain.database);
  const table = quoteTable(plain.table);
  await database.query(`CREATE INDEX ${pg.escapeIdentifier(USER_ID_INDEX)} ON ${table} (user_id)`);
  await database.query(`ANALYZE ${table}`);
  const [size] = await database.query<{ total_bytes: string }>(
    'SELECT pg_total_relation_size($1::regclass) AS total_bytes',
    [table],
  );
  const indexes = await database.query<{ name: string }>(
    `SELECT indexrelid::regclass::text AS name FROM pg_index
     WHERE indrelid = $1::regclass ORDER BY indexrelid`,
    [table],
  );
  await server.freezeTemplate(database);
  return {
    template: { ...plain, database, totalBytes: Number(size!.total_bytes) },
    indexes: indexes.map((index) => index.name),
  };
}

function summarizeCondition(
  spec: ConditionSpec,
  runs: readonly GentleRun[],
  errors: readonly string[],
  oneDeleteRowsPerSecond: number | null,
  pooledAtRestP99Ms: number | null,
): GentleCondition {
  const of = (pick: (run: GentleRun) => number | null) => medianOf(runs.map(pick));
  const rowsPerSecond = of((run) => run.rowsPerSecond);
  const atRest = of((run) => run.workloadAtRest.p99Ms);
  const during = of((run) => run.workloadDuring.p99Ms);
  // The one DELETE is one batch: its statement.
  const batch = (pick: (durations: Durations) => number | null) =>
    of((run) => (run.sweep === null ? run.slowestTransactionMs : pick(run.sweep.durations)));
  return {
    id: spec.id,
    label: spec.label,
    kind: spec.kind,
    environment: spec.environment,
    runs,
    errors,
    median: {
      wallMs: of((run) => run.wallMs),
      rowsDeleted: of((run) => run.rowsDeleted),
      rowsPerSecond,
      toOneDelete: ratio(rowsPerSecond, oneDeleteRowsPerSecond),
      batches: of((run) => run.sweep?.batches ?? 1),
      batchP50Ms: batch((durations) => durations.p50Ms),
      batchP99Ms: batch((durations) => durations.p99Ms),
      batchMaxMs: batch((durations) => durations.maxMs),
      idleShare: of((run) =>
        run.sweep === null || run.wallMs <= 0
          ? null
          : Math.max(0, 1 - run.sweep.busyMs / run.wallMs),
      ),
      walBytes: of((run) => run.walBytes),
      workloadP99AtRestMs: atRest,
      workloadP99DuringMs: during,
      workloadP99Ratio: ratio(during, atRest),
      workloadP99RatioToPooled: ratio(during, pooledAtRestP99Ms),
      busyShare: of((run) => run.workloadByBatch?.busyShare ?? null),
      operationsInBatchesShare: of((run) => {
        const split = run.workloadByBatch;
        if (split === null) return null;
        const all = split.inBatches.operations + split.betweenBatches.operations;
        return all === 0 ? null : split.inBatches.operations / all;
      }),
      workloadP99InBatchesMs: of((run) => run.workloadByBatch?.inBatches.p99Ms ?? null),
      workloadP99BetweenBatchesMs: of((run) => run.workloadByBatch?.betweenBatches.p99Ms ?? null),
    },
  };
}

/**
 * `token-reaper sweep` as a child process, as scenarios.ts runs it, keeping what its log says
 * about each batch. The wall time is the sweep's own durationMs.
 */
async function runSweep(
  url: string,
  table: string,
  environment: Readonly<Record<string, string>>,
  onStarted: () => void = () => undefined,
): Promise<{ outcome: ContenderOutcome; figures: SweepFigures }> {
  const { started, ended, during, window } = await runSweepCommand(
    url,
    table,
    environment,
    onStarted,
  );
  const batches = during.filter(
    (line) => line.event === 'sweep.batch' && typeof line['durationMs'] === 'number',
  );
  const durations = batches.map((line) => line['durationMs'] as number);
  // Each line is written as its batch ends, stamped with the wall clock to the millisecond;
  // performance.timeOrigin turns that into the workload's performance.now() time.
  const spans = batches.map((line) => {
    const to = Date.parse(line.timestamp) - performance.timeOrigin;
    return { from: to - (line['durationMs'] as number), to };
  });
  const pages = batches
    .map((line) => Number(line['toPage']) - Number(line['fromPage']))
    .filter((count) => Number.isFinite(count));
  const throttled = during.filter((line) => line.event === 'sweep.throttled');
  const computed: Durations = {
    p50Ms: percentile(durations, 0.5),
    p99Ms: percentile(durations, 0.99),
    maxMs: maximum(durations),
  };
  const reported = readDurations(ended['batchDurationMs']);
  const startedFields = Object.fromEntries(
    Object.entries(started).filter(
      ([key]) => !['timestamp', 'level', 'message', 'event'].includes(key),
    ),
  );
  const figures: SweepFigures = {
    batches: batches.length,
    reported,
    computed,
    durations: reported ?? computed,
    source: reported === null ? 'sweep.batch lines' : 'sweep.finished',
    pages: { first: pages[0] ?? null, p50: median(pages), max: maximum(pages) },
    busyMs: durations.reduce((sum, duration) => sum + duration, 0),
    throttled: throttled.length,
    firstThrottled: throttled[0] ?? null,
    series: { pages, durationMs: durations },
    startedFields,
  };
  return {
    outcome: {
      rowsReported: Number(ended['deleted']),
      wallMs: Number(ended['durationMs']),
      statements: batches.length,
      slowestTransactionMs: computed.maxMs,
      window,
      batches: spans,
      details: {
        tables: ended['tables'],
        ...(ended['partial'] ? { partial: ended['partial'] } : {}),
      },
    },
    figures,
  };
}

/** `{ p50, p99, max }` in ms, as sweep.finished's batchDurationMs; null for anything else. */
function readDurations(value: unknown): Durations | null {
  if (typeof value !== 'object' || value === null) return null;
  const { p50, p99, max } = value as Record<string, unknown>;
  if (typeof p50 !== 'number' || typeof p99 !== 'number' || typeof max !== 'number') return null;
  return { p50Ms: p50, p99Ms: p99, maxMs: max };
}

// ---------------------------------------------------------------------------------------------
// 4. A streaming standby's replay lag.

interface ReplicaSpec {
  readonly id: string;
  readonly label: string;
  readonly environment: Readonly<Record<string, string>>;
  /** Pauses the standby's replay for this long from the sweep's start (0: never). */
  readonly stallStandbyMs: number;
}

async function measureReplicaLag(options: GentleOptions): Promise<ReplicaResult> {
  const { progress } = options;
  const specs: readonly ReplicaSpec[] = [
    { id: 'defaults', label: 'sweep, defaults', environment: {}, stallStandbyMs: 0 },
    {
      id: 'max-replica-lag',
      label: `sweep, SWEEP_MAX_REPLICA_LAG=${MAX_REPLICA_LAG}`,
      environment: { SWEEP_MAX_REPLICA_LAG: MAX_REPLICA_LAG },
      stallStandbyMs: 0,
    },
    // Unpaced, the sweep writes its WAL fastest: the lag the limit has most to hold back.
    ...(options.pauseRatios.includes(0)
      ? [
          {
            id: 'pause-0',
            label: 'sweep, SWEEP_PAUSE_RATIO=0',
            environment: { SWEEP_PAUSE_RATIO: '0' },
            stallStandbyMs: 0,
          },
          {
            id: 'pause-0-max-replica-lag',
            label: `sweep, SWEEP_PAUSE_RATIO=0, SWEEP_MAX_REPLICA_LAG=${MAX_REPLICA_LAG}`,
            environment: { SWEEP_PAUSE_RATIO: '0', SWEEP_MAX_REPLICA_LAG: MAX_REPLICA_LAG },
            stallStandbyMs: 0,
          },
        ]
      : []),
    // A standby whose replay stops (pg_wal_replay_pause(), as a conflicting query or a slow
    // disk would stop it): the lag grows whatever the sweep does, and only the limit stops the
    // sweep from piling WAL on top. Not judged against the goal: the stall is the lag.
    ...(options.quick
      ? []
      : [
          {
            id: 'stalled',
            label: `sweep, defaults; standby replay paused ${STALL_MS / 1000} s`,
            environment: {},
            stallStandbyMs: STALL_MS,
          },
          {
            id: 'stalled-max-replica-lag',
            label: `sweep, SWEEP_MAX_REPLICA_LAG=${MAX_REPLICA_LAG}; standby replay paused ${STALL_MS / 1000} s`,
            environment: { SWEEP_MAX_REPLICA_LAG: MAX_REPLICA_LAG },
            stallStandbyMs: STALL_MS,
          },
        ]),
  ];
  const empty = (skipped: string | null, error: string | null): ReplicaResult => ({
    skipped,
    error,
    server: null,
    conditions: [],
  });
  const bin = await serverBinaries();
  if (bin === null) {
    const why = 'no PostgreSQL server binaries under /usr/lib/postgresql (initdb, pg_basebackup)';
    progress(`gentle, standby: skipped: ${why}`);
    return empty(why, null);
  }
  const guard = guardClusters(bin);
  let primary: Cluster | null = null;
  let standby: Cluster | null = null;
  let server: BenchServer | null = null;
  const runs = new Map<string, ReplicaRun[]>(specs.map((spec) => [spec.id, []]));
  const errors = new Map<string, string[]>(specs.map((spec) => [spec.id, []]));
  let description: ReplicaResult['server'] = null;
  try {
    progress('gentle, standby: a throwaway primary');
    primary = await createCluster({ settings: CLUSTER_SETTINGS });
    if (primary === null) return empty('no PostgreSQL server binaries', null);
    guard.add(primary.dataDirectory);
    server = await openClusterServer(primary.url);
    description = {
      version: server.description.version,
      settings: CLUSTER_SETTINGS,
      standbySettings: STANDBY_SETTINGS,
    };
    const templates = await buildTemplates(
      server,
      options.rows,
      options.revokedUnexpiredShare,
      (message) => progress(`gentle, standby: ${message}`),
      false,
    );
    const { template } = await fiveIndexTemplate(server, templates.plain);
    progress('gentle, standby: pg_basebackup -R, and the standby started');
    standby = await primary.replica(STANDBY_SETTINGS);
    guard.add(standby.dataDirectory);
    for (let run = 1; run <= options.runs; run += 1) {
      for (const spec of specs) {
        progress(`gentle, standby run ${run}/${options.runs}: ${spec.label}`);
        try {
          const result = await replicaRun(
            server,
            primary,
            standby,
            template,
            run,
            { ...options.sweepEnvironment, ...spec.environment },
            spec.stallStandbyMs,
          );
          runs.get(spec.id)!.push(result);
          progress(
            `  ${formatNumber(result.rowsDeleted, 0)} rows in ${formatMs(result.wallMs)}, ` +
              `${result.sweep.throttled} throttled, max replay_lag ${formatMs(result.maxReplayLagMs)}, ` +
              `distance ${formatBytes(result.maxDistanceBytes)}, standby-side ${formatMs(result.maxStandbyLagEstimateMs)}, ` +
              `caught up ${formatMs(result.catchUpMs)} after`,
          );
        } catch (error) {
          const message = error instanceof Error ? error.message : String(error);
          errors.get(spec.id)!.push(message);
          progress(`  failed: ${message.split('\n')[0]}`);
        }
      }
    }
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    progress(`gentle, standby failed: ${message.split('\n')[0]}`);
    return { ...empty(null, message), server: description };
  } finally {
    await server?.dispose().catch(() => undefined);
    await standby?.dispose().catch(() => undefined);
    await primary?.dispose().catch(() => undefined);
    guard.release();
  }
  return {
    skipped: null,
    error: null,
    server: description,
    conditions: specs.map((spec) =>
      summarizeReplica(spec, runs.get(spec.id)!, errors.get(spec.id)!),
    ),
  };
}

/**
 * A BenchServer on the cluster, made the way databases.ts makes one on TEST_DATABASE_URL: it
 * reads the variable when called, before its first await, so setting it around the call is
 * enough and nothing else sees it.
 */
async function openClusterServer(url: string): Promise<BenchServer> {
  const name = 'TEST_DATABASE_URL';
  const saved = process.env[name];
  process.env[name] = url;
  try {
    return await provisionServer();
  } finally {
    if (saved === undefined) delete process.env[name];
    else process.env[name] = saved;
  }
}

async function replicaRun(
  server: BenchServer,
  primary: Cluster,
  standby: Cluster,
  template: Template,
  run: number,
  environment: Readonly<Record<string, string>>,
  stallStandbyMs: number,
): Promise<ReplicaRun> {
  const database = await server.createDatabase(`gentle_standby_${run}`, template.database);
  try {
    await checkpoint(server);
    const primarySession = await connect(primary.url, 'token-reaper-bench-lag');
    const standbySession = await connect(standby.url, 'token-reaper-bench-lag');
    const standbyControl = await connect(standby.url, 'token-reaper-bench-stall');
    try {
      const position = async () =>
        lsnToNumber(
          (await primarySession.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn'))
            .rows[0]!.lsn,
        );
      // The copy and the checkpoint replayed: the sweep's WAL is all the standby has to do.
      await waitForReplay(primarySession, standbySession, await position());
      const sampler = sampleLag(primarySession, standbySession);
      let figures: SweepFigures;
      let outcome: ContenderOutcome;
      let walBytes: number;
      let catchUpMs: number;
      let sweepStartedAtMs = 0;
      let stall: Promise<void> | null = null;
      try {
        const before = await position();
        ({ outcome, figures } = await runSweep(database.url, template.table, environment, () => {
          sweepStartedAtMs = sampler.elapsedMs();
          if (stallStandbyMs > 0) stall = stallReplay(standbyControl, stallStandbyMs);
        }));
        const after = await position();
        walBytes = after - before;
        const ended = performance.now();
        await stall;
        await waitForReplay(primarySession, standbySession, after);
        catchUpMs = performance.now() - ended;
      } finally {
        await (stall as Promise<void> | null)?.catch(() => undefined);
        await sampler.stop();
      }
      // replay_lag keeps the last figure the standby reported, from before the sweep (the
      // copy's replay) until WAL flows again: the sweep's figures start at the first new one.
      const replayLagBeforeMs = sampler.samples[0]?.replayLagMs ?? null;
      const firstNew = sampler.samples.findIndex(
        (sample) => sample.atMs >= sweepStartedAtMs && sample.replayLagMs !== replayLagBeforeMs,
      );
      const samples = sampler.samples;
      const counted = firstNew < 0 ? [] : samples.slice(firstNew);
      const [check] = await database.query<{ dead: string; live: string }>(
        `SELECT count(*) FILTER (WHERE revoked OR expires_at < now()) AS dead,
                count(*) FILTER (WHERE NOT revoked AND expires_at >= now()) AS live
         FROM ${quoteTable(template.table)} WHERE token_hash NOT LIKE $1`,
        [`${WORKLOAD_HASH_PREFIX}%`],
      );
      return {
        run,
        wallMs: outcome.wallMs,
        rowsDeleted: outcome.rowsReported,
        walBytes,
        sweep: figures,
        replayLagBeforeMs,
        sweepStartedAtMs: Math.round(sweepStartedAtMs),
        maxReplayLagMs: maximum(counted.flatMap((sample) => sample.replayLagMs ?? [])),
        maxDistanceBytes: maximum(samples.flatMap((sample) => sample.distanceBytes ?? [])),
        maxStandbyDistanceBytes: maximum(
          samples.flatMap((sample) => sample.standbyDistanceBytes ?? []),
        ),
        maxStandbyLagEstimateMs: maximum(sampler.standbyLagEstimates()),
        catchUpMs,
        deadRowsLeft: Number(check!.dead),
        liveRowsDeleted: template.liveRows - Number(check!.live),
        samples: samples.map(({ atMs, replayLagMs, distanceBytes, standbyDistanceBytes }) => ({
          atMs: Math.round(atMs),
          replayLagMs,
          distanceBytes,
          standbyDistanceBytes,
        })),
      };
    } finally {
      await primarySession.end().catch(() => undefined);
      await standbySession.end().catch(() => undefined);
      await standbyControl.end().catch(() => undefined);
    }
  } finally {
    await database.drop();
  }
}

async function connect(url: string, applicationName: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url, application_name: applicationName });
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

const REPLICATION_QUERY = `
  SELECT pg_current_wal_lsn()::text AS current,
         r.replay_lsn::text AS replay,
         extract(epoch FROM r.replay_lag) * 1000 AS replay_lag_ms,
         pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn) AS distance
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (SELECT * FROM pg_stat_replication ORDER BY pid LIMIT 1) AS r ON true`;

interface ReplicationRow {
  current: string;
  replay: string | null;
  replay_lag_ms: string | null;
  distance: string | null;
}

/**
 * Waits until the standby has replayed `target`, by its own account, and the primary has heard
 * so (pg_stat_replication's replay_lsn): the standby reports its position as soon as it has
 * replayed everything it received, so its last lag figure is in by then.
 */
async function waitForReplay(primary: pg.Client, standby: pg.Client, target: number) {
  await waitFor(
    async () => {
      const [own, seen] = await Promise.all([
        standby.query<{ lsn: string | null }>('SELECT pg_last_wal_replay_lsn()::text AS lsn'),
        primary.query<ReplicationRow>(REPLICATION_QUERY),
      ]);
      const replayed = own.rows[0]?.lsn ?? null;
      const reported = seen.rows[0]?.replay ?? null;
      return (
        replayed !== null &&
        lsnToNumber(replayed) >= target &&
        reported !== null &&
        lsnToNumber(reported) >= target
      );
    },
    {
      timeoutMs: CATCH_UP_TIMEOUT_MS,
      intervalMs: 20,
      message: 'the standby to replay the primary’s WAL',
    },
  );
}

interface Sampler {
  /** ms since the sampling began. */
  elapsedMs(): number;
  readonly samples: readonly (LagSample & { currentLsn: number; standbyLsn: number | null })[];
  stop(): Promise<void>;
  standbyLagEstimates(): number[];
}

/** Every SAMPLE_INTERVAL_MS, both views at once, until stopped. */
function sampleLag(primary: pg.Client, standby: pg.Client): Sampler {
  const samples: (LagSample & { currentLsn: number; standbyLsn: number | null })[] = [];
  const origin = performance.now();
  const stopping = new AbortController();
  const loop = (async () => {
    for (let tick = 0; !stopping.signal.aborted; tick += 1) {
      const atMs = performance.now() - origin;
      const [seen, own] = await Promise.all([
        primary.query<ReplicationRow>(REPLICATION_QUERY),
        standby.query<{ lsn: string | null }>('SELECT pg_last_wal_replay_lsn()::text AS lsn'),
      ]);
      const row = seen.rows[0]!;
      const currentLsn = lsnToNumber(row.current);
      const standbyLsn = own.rows[0]?.lsn ? lsnToNumber(own.rows[0].lsn) : null;
      samples.push({
        atMs,
        replayLagMs: row.replay_lag_ms === null ? null : Number(row.replay_lag_ms),
        distanceBytes: row.distance === null ? null : Number(row.distance),
        standbyDistanceBytes: standbyLsn === null ? null : Math.max(0, currentLsn - standbyLsn),
        currentLsn,
        standbyLsn,
      });
      const next = origin + (tick + 1) * SAMPLE_INTERVAL_MS - performance.now();
      if (next > 0)
        await delay(next, undefined, { signal: stopping.signal }).catch(() => undefined);
    }
  })();
  return {
    samples,
    elapsedMs: () => performance.now() - origin,
    async stop() {
      stopping.abort();
      await loop;
    },
    standbyLagEstimates() {
      // For each tick: the age of the oldest WAL the standby has not replayed yet, from the
      // first tick at which the primary stood past the standby's position now. That WAL was
      // written between that tick and the one before, so this is a lower bound, to within a tick.
      return samples.flatMap((sample) => {
        if (sample.standbyLsn === null) return [];
        if (sample.standbyLsn >= sample.currentLsn) return [0];
        const reached = samples.find((earlier) => earlier.currentLsn > sample.standbyLsn!);
        return reached === undefined ? [] : [Math.max(0, sample.atMs - reached.atMs)];
      });
    },
  };
}

/** Pauses the standby's replay for `ms`, then resumes it, whatever happens. */
async function stallReplay(standby: pg.Client, ms: number): Promise<void> {
  await standby.query('SELECT pg_wal_replay_pause()');
  try {
    await delay(ms);
  } finally {
    await standby.query('SELECT pg_wal_replay_resume()');
  }
}

/** `16/B374D848` → a byte position (exact below 2^53, 8 PB of WAL). */
function lsnToNumber(lsn: string): number {
  const [high, low] = lsn.split('/');
  return Number((BigInt(`0x${high}`) << 32n) | BigInt(`0x${low}`));
}

/**
 * Stops and removes the clusters should the benchmark exit before it disposes of them (Ctrl-C:
 * bench.ts exits once its own server is cleaned up). 'exit' listeners must be synchronous.
 */
function guardClusters(bin: string) {
  const directories = new Set<string>();
  const asRoot = process.getuid?.() === 0;
  const stopAll = () => {
    for (const directory of [...directories].reverse()) {
      const pgCtl = join(bin, 'pg_ctl');
      const args = ['-D', directory, '-m', 'immediate', '-w', 'stop'];
      try {
        execFileSync(
          asRoot ? 'runuser' : pgCtl,
          asRoot ? ['-u', 'postgres', '--', pgCtl, ...args] : args,
          {
            stdio: 'ignore',
            timeout: 30_000,
          },
        );
      } catch {
        // Not running.
      }
      rmSync(directory, { recursive: true, force: true });
    }
  };
  process.on('exit', stopAll);
  return {
    add: (directory: string) => directories.add(directory),
    release: () => process.off('exit', stopAll),
  };
}

function summarizeReplica(
  spec: ReplicaSpec,
  runs: readonly ReplicaRun[],
  errors: readonly string[],
): ReplicaCondition {
  const of = (pick: (run: ReplicaRun) => number | null) => medianOf(runs.map(pick));
  const worst = (pick: (run: ReplicaRun) => number | null) =>
    maximum(runs.flatMap((run) => pick(run) ?? []));
  return {
    id: spec.id,
    label: spec.label,
    environment: spec.environment,
    runs,
    errors,
    median: {
      wallMs: of((run) => run.wallMs),
      rowsPerSecond: of((run) => (run.wallMs > 0 ? run.rowsDeleted / (run.wallMs / 1000) : null)),
      batchP99Ms: of((run) => run.sweep.durations.p99Ms),
      throttled: of((run) => run.sweep.throttled),
      maxReplayLagMs: of((run) => run.maxReplayLagMs),
      maxDistanceBytes: of((run) => run.maxDistanceBytes),
      maxStandbyLagEstimateMs: of((run) => run.maxStandbyLagEstimateMs),
      catchUpMs: of((run) => run.catchUpMs),
    },
    worst: {
      maxReplayLagMs: worst((run) => run.maxReplayLagMs),
      maxDistanceBytes: worst((run) => run.maxDistanceBytes),
      maxStandbyLagEstimateMs: worst((run) => run.maxStandbyLagEstimateMs),
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Goals, problems and the report.

export function judgeGentleGoals(gentle: GentleResult | null): Goal[] {
  if (gentle === null) return [];
  const defaults = gentle.conditions.find((condition) => condition.id === 'defaults');
  const judged = (goal: string, value: number | null, target: number, unit: string) => ({
    goal,
    measured: value === null ? 'not measured' : `${formatNumber(value, 2)}${unit}`,
    met: value === null ? null : value <= target,
  });
  // At the defaults, and unpaced when measured: the largest of any run of either.
  const lag = maximum(
    gentle.replica.conditions
      .filter(
        (condition) =>
          condition.environment['SWEEP_MAX_REPLICA_LAG'] !== undefined &&
          !condition.id.startsWith('stalled'),
      )
      .flatMap((condition) => condition.worst.maxReplayLagMs ?? []),
  );
  return [
    judged(
      `gentle: sweep batch p99 ≤ ${BATCH_P99_GOAL_MS} ms at the defaults (median of runs)`,
      defaults?.median.batchP99Ms ?? null,
      BATCH_P99_GOAL_MS,
      ' ms',
    ),
    judged(
      `gentle: workload p99 during the sweep ≤ ${WORKLOAD_P99_GOAL} × at rest, at the defaults`,
      defaults?.median.workloadP99Ratio ?? null,
      WORKLOAD_P99_GOAL,
      '×',
    ),
    judged(
      `gentle: standby replay lag ≤ ${REPLAY_LAG_GOAL_MS / 1000} s with SWEEP_MAX_REPLICA_LAG=${MAX_REPLICA_LAG} (largest replay_lag of any run)`,
      lag === null ? null : lag / 1000,
      REPLAY_LAG_GOAL_MS / 1000,
      ' s',
    ),
  ];
}

/** Warnings for a reader, and whether the run failed: a crash or a wrong deletion. */
export function collectGentleProblems(
  gentle: GentleResult | null,
  gentleError: string | null,
  warnings: string[],
): boolean {
  let failed = gentleError !== null;
  if (gentleError !== null) warnings.push(`gentle crashed: ${gentleError.split('\n')[0]}`);
  if (gentle === null) return failed;
  for (const condition of gentle.conditions) {
    for (const error of condition.errors) {
      failed = true;
      warnings.push(`gentle, ${condition.label} crashed: ${error.split('\n')[0]}`);
    }
    for (const run of condition.runs) {
      const where = `gentle, ${condition.label}, run ${run.run}`;
      if (run.check.deadRowsLeft > 0 || run.check.liveRowsDeleted !== 0) {
        failed = true;
        warnings.push(
          `${where}: CORRECTNESS: ${run.check.deadRowsLeft} rows dead before the run are left, ` +
            `${run.check.liveRowsDeleted} live rows were deleted`,
        );
      }
      const failedOperations = run.workloadAtRest.failed + run.workloadDuring.failed;
      if (failedOperations > 0) {
        warnings.push(`${where}: ${failedOperations} workload operations failed`);
      }
    }
  }
  const replica = gentle.replica;
  if (replica.skipped !== null) warnings.push(`gentle, standby: skipped: ${replica.skipped}`);
  if (replica.error !== null) {
    failed = true;
    warnings.push(`gentle, standby crashed: ${replica.error.split('\n')[0]}`);
  }
  for (const condition of replica.conditions) {
    for (const error of condition.errors) {
      failed = true;
      warnings.push(`gentle, standby, ${condition.label} crashed: ${error.split('\n')[0]}`);
    }
    for (const run of condition.runs) {
      if (run.deadRowsLeft > 0 || run.liveRowsDeleted !== 0) {
        failed = true;
        warnings.push(
          `gentle, standby, ${condition.label}, run ${run.run}: CORRECTNESS: ${run.deadRowsLeft} dead rows left, ` +
            `${run.liveRowsDeleted} live rows deleted`,
        );
      }
    }
  }
  const reported = gentle.conditions.some((condition) =>
    condition.runs.some((run) => run.sweep !== null && run.sweep.reported === null),
  );
  if (reported) {
    warnings.push(
      'gentle: a sweep.finished line had no batchDurationMs; its batch durations were computed from the sweep.batch debug lines',
    );
  }
  return failed;
}

export function renderGentle(
  gentle: GentleResult | null,
  gentleError: string | null,
  lines: string[],
) {
  if (gentle === null) {
    if (gentleError !== null) lines.push('', '## Gentle sweep', '', `Failed: ${gentleError}`);
    return;
  }
  const runs = Math.max(0, ...gentle.conditions.map((condition) => condition.runs.length));
  const { data } = gentle;
  lines.push(
    '',
    `## Gentle sweep: five indexes, the workload beside it, medians of ${runs} alternating run${runs === 1 ? '' : 's'}`,
    '',
    `${formatNumber(data.rows, 0)} rows, ${formatNumber(data.deadRows, 0)} dead, ` +
      `${formatNumber(data.heapPages, 0)} heap pages, ${formatBytes(data.totalBytes)} with its ` +
      `${data.indexes.length} indexes (${data.indexes.join(', ')}).`,
    '',
    '| condition | wall time | rows/s | × one DELETE | batches | batch p50 / p99 / max | pages per batch (first / median / max) | time outside batches | WAL | workload p99 at rest → during | × at rest | × pooled at rest |',
    '|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
  );
  let computedOnly = false;
  const defaults = [
    gentle.defaults.batchTargetMs === null
      ? null
      : `SWEEP_BATCH_TARGET_MS=${gentle.defaults.batchTargetMs}`,
    gentle.defaults.pauseRatio === null ? null : `SWEEP_PAUSE_RATIO=${gentle.defaults.pauseRatio}`,
  ].filter((setting) => setting !== null);
  for (const condition of gentle.conditions) {
    const label =
      condition.id === 'defaults' && defaults.length > 0
        ? `${condition.label} (${defaults.join(', ')})`
        : condition.label;
    if (condition.runs.length === 0) {
      lines.push(
        `| ${label} | failed: ${condition.errors[0]?.split('\n')[0] ?? 'no run'} |||||||||||`,
      );
      continue;
    }
    const median = condition.median;
    const pages = (pick: (figures: SweepFigures) => number | null) =>
      formatNumber(
        medianOf(condition.runs.map((run) => (run.sweep === null ? null : pick(run.sweep)))),
        0,
      );
    const computed = condition.runs.some((run) => run.sweep?.source === 'sweep.batch lines');
    computedOnly ||= computed;
    lines.push(
      `| ${label} | ${formatMs(median.wallMs)} | ${formatNumber(median.rowsPerSecond, 0)} | ` +
        `${formatRatio(median.toOneDelete)} | ${formatNumber(median.batches, 0)} | ` +
        `${formatMs(median.batchP50Ms)} / ${formatMs(median.batchP99Ms)} / ${formatMs(median.batchMaxMs)}` +
        `${computed ? ' ‡' : ''} | ` +
        (condition.kind === 'delete'
          ? '– | – | '
          : `${pages((figures) => figures.pages.first)} / ${pages((figures) => figures.pages.p50)} / ${pages((figures) => figures.pages.max)} | ` +
            `${median.idleShare === null ? '–' : `${formatNumber(median.idleShare * 100, 0)}%`} | `) +
        `${formatBytes(median.walBytes)} | ` +
        `${formatMs(median.workloadP99AtRestMs)} → ${formatMs(median.workloadP99DuringMs)} | ` +
        `${formatRatio(median.workloadP99Ratio)} | ${formatRatio(median.workloadP99RatioToPooled)} |`,
    );
  }
  lines.push(
    '',
    'Batch durations: sweep.finished’s batchDurationMs' +
      (computedOnly
        ? ', or where marked ‡ computed from the sweep.batch debug lines (sweep.finished had none)'
        : '') +
      '; the one DELETE is one batch, its statement. Time outside batches: 1 − the sum of the ' +
      'batch durations ÷ the wall time (pauses, throttling, and the walk between batches). ' +
      '× at rest: the median p99 during ÷ the median p99 at rest of the same condition (the ' +
      'goal’s measure); × pooled at rest: ÷ the median at-rest p99 of every run of every ' +
      `condition (${formatMs(gentle.pooledAtRestP99Ms)}), a steadier baseline.`,
    '',
    gentle.smallestPauseRatioWithinGoal === null
      ? `No SWEEP_PAUSE_RATIO of ${gentle.pauseRatios.join(', ')} kept the workload p99 ≤ ${WORKLOAD_P99_GOAL} × at rest.`
      : `The smallest SWEEP_PAUSE_RATIO of ${gentle.pauseRatios.join(', ')} that kept the workload p99 ≤ ` +
          `${WORKLOAD_P99_GOAL} × at rest: **${gentle.smallestPauseRatioWithinGoal}**.`,
  );
  renderByBatch(gentle, lines);
  renderReplica(gentle.replica, lines);
}

/** Where the workload's slow operations fell: while a batch ran, or between batches. */
function renderByBatch(gentle: GentleResult, lines: string[]) {
  const sweeps = gentle.conditions.filter(
    (condition) => condition.kind === 'sweep' && condition.median.busyShare !== null,
  );
  if (sweeps.length === 0) return;
  const percent = (share: number | null) =>
    share === null ? '–' : `${formatNumber(share * 100, 0)}%`;
  lines.push(
    '',
    '| sweep condition | time in batches | operations overlapping a batch | workload p99 at rest | p99 overlapping a batch | p99 between batches |',
    '|---|--:|--:|--:|--:|--:|',
    ...sweeps.map(
      ({ label, median }) =>
        `| ${label} | ${percent(median.busyShare)} | ${percent(median.operationsInBatchesShare)} | ` +
        `${formatMs(median.workloadP99AtRestMs)} | ${formatMs(median.workloadP99InBatchesMs)} | ` +
        `${formatMs(median.workloadP99BetweenBatchesMs)} |`,
    ),
    '',
    'An operation overlaps a batch when any of it, from when it was due to when it ended, fell ' +
      'between a batch’s start and its end (the sweep.batch line’s time, less its durationMs). ' +
      'Slow operations between batches are what the batches leave behind (dirty pages, WAL to ' +
      'write, the server’s background work), which pauses alone do not remove.',
  );
}

function renderReplica(replica: ReplicaResult, lines: string[]) {
  lines.push('', '## Gentle sweep: a streaming standby’s replay lag', '');
  if (replica.skipped !== null) {
    lines.push(`Skipped: ${replica.skipped}.`);
    return;
  }
  if (replica.error !== null) {
    lines.push(`Failed: ${replica.error.split('\n')[0]}`);
    return;
  }
  const runs = Math.max(0, ...replica.conditions.map((condition) => condition.runs.length));
  lines.push(
    `A throwaway PostgreSQL ${replica.server?.version ?? ''} primary (${(replica.server?.settings ?? []).join(', ')}) ` +
      `with a streaming standby (pg_basebackup -R, ${(replica.server?.standbySettings ?? []).join(', ')}, on the same machine), the same five-index table, ` +
      `no workload; sampled every ${SAMPLE_INTERVAL_MS} ms from before the sweep until the standby had ` +
      `replayed all of it. Medians of ${runs} alternating run${runs === 1 ? '' : 's'}; the largest of any run in parentheses.`,
    '',
    '| condition | wall time | rows/s | batch p99 | throttled | max replay_lag | max pg_wal_lsn_diff(current, replay_lsn) | standby-side lag estimate | standby caught up after the sweep |',
    '|---|--:|--:|--:|--:|--:|--:|--:|--:|',
  );
  for (const condition of replica.conditions) {
    if (condition.runs.length === 0) {
      lines.push(
        `| ${condition.label} | failed: ${condition.errors[0]?.split('\n')[0] ?? 'no run'} ||||||||`,
      );
      continue;
    }
    const { median, worst } = condition;
    lines.push(
      `| ${condition.label} | ${formatMs(median.wallMs)} | ${formatNumber(median.rowsPerSecond, 0)} | ` +
        `${formatMs(median.batchP99Ms)} | ${formatNumber(median.throttled, 0)} | ` +
        `${formatMs(median.maxReplayLagMs)} (${formatMs(worst.maxReplayLagMs)}) | ` +
        `${formatBytes(median.maxDistanceBytes)} (${formatBytes(worst.maxDistanceBytes)}) | ` +
        `${formatMs(median.maxStandbyLagEstimateMs)} (${formatMs(worst.maxStandbyLagEstimateMs)}) | ` +
        `${formatMs(median.catchUpMs)} |`,
    );
  }
  lines.push(
    '',
    'replay_lag is pg_stat_replication’s, on the primary: for the WAL the standby last said it ' +
      'replayed, how long ago the primary flushed it; counted from the first figure the standby ' +
      'reported after the sweep started (until then it shows the replay of the copy). ' +
      `“Standby replay paused”: pg_wal_replay_pause() on the standby from sweep.started for ${STALL_MS / 1000} s, ` +
      'a standby whose replay stops (a conflicting query, a slow disk); not judged against the ' +
      'goal, since the pause itself is the lag. The standby-side estimate: the age of the ' +
      'oldest WAL the standby had not replayed yet (how long ago the primary first stood past ' +
      `pg_last_wal_replay_lsn() on the standby), to within ${SAMPLE_INTERVAL_MS} ms.`,
  );
}
