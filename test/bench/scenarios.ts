// The sweep contenders, and how one run of a contender is measured.
//
// One run: copy the contender's template (CREATE DATABASE … TEMPLATE), connect and warm up the
// workload, CHECKPOINT, run it at rest, CHECKPOINT, then run the contender with the workload
// beside it, then check the table. The CHECKPOINT makes every contender start in the same state:
// after a checkpoint, the first change to each page writes a full-page image into the WAL, so
// WAL figures only compare when every contender starts right after one (as a daily sweep in
// production does, with checkpoints minutes apart). The at-rest window starts after one too:
// the workload's own first writes to each index page then pay their full-page images in both
// windows, and what differs between them is the contender alone. WAL accounting is in wal.ts.
import pg from 'pg';

import { spawnDaemon, type LogLine } from '../support/cli.js';
import { quoteTable } from '../support/fixtures.js';

import type { BenchDatabase, BenchServer } from './databases.js';
import { maximum } from './statistics.js';
import type { Template, Templates } from './templates.js';
import {
  connectWorkload,
  splitByBatch,
  summarizeWorkload,
  WORKLOAD_HASH_PREFIX,
  type TimeSpan,
  type WorkloadByBatch,
  type WorkloadRecording,
  type WorkloadSummary,
} from './workload.js';
import { openWalWindow, type WalAccount } from './wal.js';

/** The batch size DESIGN.md measured for the LIMIT pattern. */
const LIMIT_BATCH_ROWS = 10_000;
/** Bounds a child sweep; a healthy one at the default size takes seconds. */
const SWEEP_TIMEOUT_MS = 10 * 60_000;
/** The workload stops by itself after this long, should a contender hang. */
const WORKLOAD_MAXIMUM_DURATION_MS = 15 * 60_000;

export type ScenarioId =
  'naive' | 'limit-batched' | 'sweep' | 'sweep-concurrency-2' | 'partitioned-sweep';

export interface ContenderOutcome {
  /** What the contender says it deleted: rowCount, or the sweep's `deleted`. */
  readonly rowsReported: number;
  readonly wallMs: number;
  /** Statements (batches) that deleted. */
  readonly statements: number;
  /** The longest single transaction, so the longest any row lock was held. */
  readonly slowestTransactionMs: number | null;
  /** When the deleting ran, in performance.now() time: the workload is judged within it. */
  readonly window: { readonly from: number; readonly to: number };
  /**
   * When each of its batches ran, in the same time, where the contender reports them: the
   * workload's operations are then told apart by whether they overlapped one.
   */
  readonly batches?: readonly TimeSpan[];
  readonly details: Readonly<Record<string, unknown>>;
}

interface ContenderContext {
  readonly database: BenchDatabase;
  readonly template: Template;
  /** Extra settings for every token-reaper sweep (--sweep-env), e.g. SWEEP_BATCH_PAGES. */
  readonly sweepEnvironment: Readonly<Record<string, string>>;
}

export interface Scenario {
  readonly id: ScenarioId;
  readonly label: string;
  readonly template: 'plain' | 'partitioned';
  run(context: ContenderContext): Promise<ContenderOutcome>;
}

export const SCENARIOS: readonly Scenario[] = [
  {
    id: 'naive',
    label: '(a) one DELETE',
    template: 'plain',
    run: deleteInOneStatement,
  },
  {
    id: 'limit-batched',
    label: '(b) LIMIT 10,000 batches',
    template: 'plain',
    run: deleteInLimitBatches,
  },
  {
    id: 'sweep',
    label: '(c) token-reaper sweep',
    template: 'plain',
    run: (context) => sweepWithCli(context, {}),
  },
  {
    id: 'sweep-concurrency-2',
    label: '(c2) sweep, SWEEP_CONCURRENCY=2',
    template: 'plain',
    run: (context) => sweepWithCli(context, { SWEEP_CONCURRENCY: '2' }),
  },
  {
    id: 'partitioned-sweep',
    label: '(d) sweep, daily partitions',
    template: 'partitioned',
    run: (context) => sweepWithCli(context, {}),
  },
];

export interface CorrectnessCheck {
  /** Rows of the template that are gone: what the contender deleted, counted by the bench. */
  readonly rowsGone: number;
  /** Rows that were dead before the run and are still there: should be 0. */
  readonly deadRowsLeft: number;
  /** Rows that were live before the run and are gone: must be 0. */
  readonly liveRowsDeleted: number;
}

export interface ScenarioRun {
  readonly scenario: ScenarioId;
  readonly run: number;
  readonly wallMs: number;
  /**
   * Rows of the template gone after the run, counted by the bench, so that rows that went
   * with a dropped partition count too, and the workload's own tokens never do.
   */
  readonly rowsDeleted: number;
  readonly rowsPerSecond: number;
  readonly statements: number;
  readonly slowestTransactionMs: number | null;
  /** The contender's WAL: its share from pg_walinspect, else everything the server wrote. */
  readonly walBytes: number;
  readonly wal: WalAccount;
  readonly workloadAtRest: WorkloadSummary;
  readonly workloadDuring: WorkloadSummary;
  /** The operations of workloadDuring split by whether they overlapped a batch, when known. */
  readonly workloadByBatch: WorkloadByBatch | null;
  readonly check: CorrectnessCheck;
  readonly details: Readonly<Record<string, unknown>>;
}

export interface RunOptions {
  readonly run: number;
  readonly sweepEnvironment: Readonly<Record<string, string>>;
  readonly workloadClients: number;
  readonly workloadOperationsPerSecond: number;
  readonly atRestMs: number;
}

export async function runScenario(
  server: BenchServer,
  templates: Templates,
  scenario: Scenario,
  options: RunOptions,
): Promise<ScenarioRun> {
  const template = templates[scenario.template];
  if (template === null) throw new Error(`the ${scenario.template} template was not built`);
  const database = await server.createDatabase(`${scenario.id}_${options.run}`, template.database);
  try {
    const workload = await connectWorkload({
      url: database.url,
      table: quoteTable(template.table),
      clients: options.workloadClients,
      operationsPerSecondPerClient: options.workloadOperationsPerSecond / options.workloadClients,
      lookupHashes: templates.lookupHashes,
      maximumDurationMs: WORKLOAD_MAXIMUM_DURATION_MS,
    });
    try {
      await workload.warmUp();
      // At rest: the same copy, nothing deleting, from a checkpoint as the contender's window.
      await checkpoint(server);
      const rest = await workload.runFor(options.atRestMs);

      await checkpoint(server);
      const walWindow = await openWalWindow(server);
      let outcome: ContenderOutcome;
      let recording: WorkloadRecording;
      let wal: WalAccount;
      try {
        const running = workload.start();
        try {
          outcome = await scenario.run({
            database,
            template,
            sweepEnvironment: options.sweepEnvironment,
          });
        } finally {
          recording = await running.stop();
        }
        wal = await walWindow.finish(database, recording.transactionIds, templates.walInspect);
      } finally {
        await walWindow.close();
      }
      const check = await checkCorrectness(database, template);
      return {
        scenario: scenario.id,
        run: options.run,
        wallMs: outcome.wallMs,
        rowsDeleted: check.rowsGone,
        rowsPerSecond: check.rowsGone / (outcome.wallMs / 1000),
        statements: outcome.statements,
        slowestTransactionMs: outcome.slowestTransactionMs,
        walBytes: wal.contenderBytes ?? wal.totalBytes,
        wal,
        workloadAtRest: summarizeWorkload(rest.samples),
        workloadDuring: summarizeWorkload(recording.samples, outcome.window),
        workloadByBatch:
          outcome.batches === undefined
            ? null
            : splitByBatch(recording.samples, outcome.window, outcome.batches),
        check,
        details: { rowsReported: outcome.rowsReported, ...outcome.details },
      };
    } finally {
      await workload.close();
    }
  } finally {
    await database.drop();
  }
}

/** (a) The story's query: one statement, one transaction, one backend. */
async function deleteInOneStatement({ database, template }: ContenderContext) {
  return withClient(database, async (client) => {
    const from = performance.now();
    const result = await client.query(
      `DELETE FROM ${quoteTable(template.table)} WHERE revoked OR expires_at < now()`,
    );
    const to = performance.now();
    return {
      rowsReported: result.rowCount ?? 0,
      wallMs: to - from,
      statements: 1,
      slowestTransactionMs: to - from,
      window: { from, to },
      details: {},
    };
  });
}

/**
 * (b) The pattern most peers ship. It stops at the first batch that comes back short rather
 * than at the first that deletes nothing: with the workload revoking tokens beside it, "until
 * 0 rows" could go on for as long as the workload does. A short batch found every row that was
 * dead in its snapshot, so the rows that were dead before the run are all gone either way.
 */
async function deleteInLimitBatches({ database, template }: ContenderContext) {
  const table = quoteTable(template.table);
  return withClient(database, async (client) => {
    const durations: number[] = [];
    let rowsDeleted = 0;
    const from = performance.now();
    for (;;) {
      const started = performance.now();
      const result = await client.query(
        `DELETE FROM ${table} WHERE id IN (
           SELECT id FROM ${table} WHERE revoked OR expires_at < now() LIMIT ${LIMIT_BATCH_ROWS})`,
      );
      durations.push(performance.now() - started);
      rowsDeleted += result.rowCount ?? 0;
      if ((result.rowCount ?? 0) < LIMIT_BATCH_ROWS) break;
    }
    const to = performance.now();
    return {
      rowsReported: rowsDeleted,
      wallMs: to - from,
      statements: durations.length,
      slowestTransactionMs: maximum(durations),
      window: { from, to },
      details: { firstBatchMs: durations[0], lastBatchMs: durations.at(-1) },
    };
  });
}

/**
 * (c), (c2), (d): the real `token-reaper sweep`, as a child process. The wall time is the
 * sweep's own `durationMs` (from before it takes its lock to its last batch), which leaves out
 * Node's start-up. The slowest transaction is the largest `durationMs` of the sweep's log lines
 * in between: today only `sweep.batch` (TID-range batches) carries one. On a partitioned table
 * the DDL and the revoked-row batches are not timed in the logs; for the DDL, the gap before
 * each `sweep.partition_*` line bounds its transaction from above and goes into the details.
 */
async function sweepWithCli(
  { database, template, sweepEnvironment }: ContenderContext,
  environment: Readonly<Record<string, string>>,
): Promise<ContenderOutcome> {
  const spawnedAt = performance.now();
  const { started, ended, during, window } = await runSweepCommand(database.url, template.table, {
    ...sweepEnvironment,
    ...environment,
  });
  const timed = during.filter((line) => typeof line['durationMs'] === 'number');
  return {
    rowsReported: Number(ended['deleted']),
    wallMs: Number(ended['durationMs']),
    statements: timed.length,
    slowestTransactionMs: maximum(timed.map((line) => line['durationMs'] as number)),
    window,
    details: {
      processWallMs: Math.round(performance.now() - spawnedAt),
      // Against wallMs, what the sweep spends between its timed statements.
      timedStatementsMs: timed.reduce((sum, line) => sum + (line['durationMs'] as number), 0),
      events: countEvents(during),
      tables: ended['tables'],
      slowestBatch: slowestLine(timed),
      partitionDdlMaxGapMs: largestGapBefore(during, started, /^sweep\.partition_/),
    },
  };
}

/** What one `token-reaper sweep` process logged, and when it swept. */
export interface SweepCommandRun {
  started: LogLine;
  ended: LogLine;
  /** The lines between sweep.started and sweep.finished. */
  during: LogLine[];
  /** From sweep.started to sweep.finished, as the bench's clock saw them. */
  window: { from: number; to: number };
}

/**
 * Runs `token-reaper sweep` on `table` at debug level, and throws unless it finished and
 * exited 0. `onStarted` runs as soon as the sweep has logged sweep.started.
 */
export async function runSweepCommand(
  url: string,
  table: string,
  environment: Readonly<Record<string, string>>,
  onStarted: () => void = () => undefined,
): Promise<SweepCommandRun> {
  const child = spawnDaemon(['sweep'], {
    DATABASE_URL: url,
    REFRESH_TOKENS_TABLE: table,
    PASSWORD_RESETS_TABLE: 'none',
    LOG_LEVEL: 'debug',
    ...environment,
  });
  try {
    const started = await child.waitForLog('sweep.started', SWEEP_TIMEOUT_MS);
    const from = performance.now();
    onStarted();
    const ended = await child.waitForLog(
      (line) => ['sweep.finished', 'sweep.failed', 'sweep.skipped'].includes(line.event),
      SWEEP_TIMEOUT_MS,
    );
    const to = performance.now();
    const status = await child.exited;
    if (ended.event !== 'sweep.finished' || status.code !== 0) {
      throw new Error(
        `token-reaper sweep ended with ${ended.event}, exit code ${status.code}\n${child.describeOutput()}`,
      );
    }
    const during = child.logs.slice(child.logs.indexOf(started) + 1, child.logs.indexOf(ended));
    return { started, ended, during, window: { from, to } };
  } finally {
    await child.kill();
  }
}

function countEvents(lines: readonly LogLine[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const line of lines) counts[line.event] = (counts[line.event] ?? 0) + 1;
  return counts;
}

function slowestLine(lines: readonly LogLine[]): LogLine | null {
  return lines.reduce<LogLine | null>(
    (found, line) =>
      found === null || (line['durationMs'] as number) > (found['durationMs'] as number)
        ? line
        : found,
    null,
  );
}

/** The longest time between a line matching `event` and the line before it, from timestamps. */
function largestGapBefore(lines: readonly LogLine[], first: LogLine, event: RegExp): number | null {
  const gaps: number[] = [];
  let previous = first;
  for (const line of lines) {
    if (event.test(line.event)) {
      gaps.push(Date.parse(line.timestamp) - Date.parse(previous.timestamp));
    }
    previous = line;
  }
  return maximum(gaps);
}

/**
 * Counts the rows that existed before the run (the workload's hashes are prefixed): none of
 * them may still be dead, and exactly as many as the template had live must be left. Dead and
 * live are judged by now(), and no template row changes state within an hour of its creation.
 */
async function checkCorrectness(
  database: BenchDatabase,
  template: Template,
): Promise<CorrectnessCheck> {
  const [row] = await database.query<{ dead: string; live: string }>(
    `SELECT count(*) FILTER (WHERE revoked OR expires_at < now()) AS dead,
            count(*) FILTER (WHERE NOT revoked AND expires_at >= now()) AS live
     FROM ${quoteTable(template.table)} WHERE token_hash NOT LIKE $1`,
    [`${WORKLOAD_HASH_PREFIX}%`],
  );
  return {
    rowsGone: template.rows - Number(row!.dead) - Number(row!.live),
    deadRowsLeft: Number(row!.dead),
    liveRowsDeleted: template.liveRows - Number(row!.live),
  };
}

export async function checkpoint(server: BenchServer): Promise<void> {
  await server.withClient((client) => client.query('CHECKPOINT'));
}

async function withClient<T>(database: BenchDatabase, work: (client: pg.Client) => Promise<T>) {
  const client = new pg.Client({
    connectionString: database.url,
    application_name: 'token-reaper-bench-contender',
  });
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}
