// One sweep at a time, everywhere. Within the process a request that arrives while a sweep
// runs joins it instead of starting another (node-cron's own noOverlap does not cover
// task.execute(), and SIGUSR1 bypasses node-cron entirely). Across replicas a session-level
// advisory lock decides: the replica that does not get it logs `sweep.skipped`. The lock
// lives on a session connection of its own (LISTEN_DATABASE_URL, never through a
// transaction-mode pooler) held for the whole sweep, so a crashed replica releases it with its
// connection.
//
// A sweep never throws: every failure ends as a `sweep.failed` line and a resolved outcome,
// so nothing can escape into node-cron or a signal handler and crash the daemon.
//
// Dead rows another transaction holds locked are left by their batch (see tid-range.ts) and
// reported as `skipped`. Once the sweep has finished, their page ranges are retried in the
// background with a growing backoff, until they are gone, the sweeper stops, a new sweep
// starts (it walks them again), or the retry period is over: a lock held that long belongs to
// a stuck or very long transaction, retrying it only adds load, and the next sweep gets it.
import { setTimeout as delay } from 'node:timers/promises';
import type { DatabasePool } from 'slonik';
import type { Config } from '../config.js';
import { APPLICATION_NAME, trySessionLock } from '../db.js';
import { jittered } from '../retry.js';
import { createReaperEvents, type ReaperEvents } from '../events.js';
import type { Logger } from '../logger.js';
import type { TargetRule } from '../targets/rule.js';
import { forgetRevocations, recordUnseenRevocations } from '../revocations.js';
import {
  describeTarget,
  qualifiedName,
  recordsRevocationTimes,
  type TableShape,
} from '../schema.js';
import { sweepPartitions, type PartitionReport } from './partitions.js';
import { trackProgress, type ProgressTracker } from './progress.js';
import { createPacer, distribution, type BatchDurations } from './pacing.js';
import { POSITIONS, readPositions } from './positions.js';
import {
  createReplicaGate,
  MAX_PAUSE_MS,
  type ReplicaGate,
  type ReplicaLag,
} from './replica-lag.js';
import {
  deleteTidRange,
  walkTidRanges,
  type BatchReport,
  type TidRange,
  type TidRangeWalk,
} from './tid-range.js';

export type SweepTrigger = 'schedule' | 'signal' | 'cli' | 'api';

export interface SweepOptions {
  /** Count what would be deleted, delete nothing. */
  dryRun?: boolean;
}

export interface TableSweepResult {
  deleted: number;
  /** Dead rows left because another transaction held them locked; retried after the sweep. */
  skipped: number;
  /** Dry runs only: the rows a real sweep would delete now. */
  wouldDelete?: number;
  batches: number;
  /** The distribution of this table's batch durations; null when no batch ran. */
  batchDurationMs: BatchDurations | null;
  /** Where the walk started when it resumed an unfinished one (positions.ts). */
  resumedFromPage?: number;
  /** False when the sweep ended before this table's walk did. */
  complete: boolean;
  partitionsDropped: number;
  durationMs: number;
  /** The partition strategy's own figures (see sweep/partitions.ts). */
  partitions?: PartitionReport;
}

export type SweepOutcome =
  | {
      status: 'finished';
      trigger: SweepTrigger;
      dryRun: boolean;
      /** True when a stop request ended the sweep between batches. */
      interrupted: boolean;
      /**
       * True when the sweep ended before walking everything: the next sweep resumes each
       * table where this one stopped.
       */
      partial: boolean;
      /** Why, when partial: a stop, the SWEEP_MAX_DURATION window, or a replica lagging too long. */
      endedBy?: SweepEnd;
      deleted: number;
      /** Dead rows left locked, in all tables; retried after the sweep. */
      skipped: number;
      durationMs: number;
      /** Batch durations of all tables together; null when no batch ran. */
      batchDurationMs: BatchDurations | null;
      tables: Record<string, TableSweepResult>;
    }
  | { status: 'skipped'; trigger: SweepTrigger; reason: string }
  | { status: 'failed'; trigger: SweepTrigger; error: unknown; durationMs: number };

export interface Sweeper {
  sweep(trigger: SweepTrigger, options?: SweepOptions): Promise<SweepOutcome>;
  /**
   * Settles once the retry of the rows the last sweep left locked is over: all deleted, given
   * up after the retry period, or stopped. At once when nothing is being retried.
   */
  retrySettled(): Promise<void>;
  /**
   * Stops a running sweep between batches and a retry between ranges, and waits for both;
   * later requests are skipped.
   */
  stop(): Promise<void>;
}

/** How the rows a sweep left locked are retried: a jittered, doubling backoff, for a period. */
export interface LockedRowsRetry {
  firstDelayMs: number;
  maxDelayMs: number;
  /** From the end of the sweep; then the rows still locked wait for the next sweep. */
  periodMs: number;
}

/**
 * A lock taken for one auth request is gone by the first retry, a second later. Five minutes
 * outlast any transaction a healthy auth service runs (and the default statement timeout ten
 * times over) while keeping a stuck one from being polled for hours.
 */
export const LOCKED_ROWS_RETRY: LockedRowsRetry = {
  firstDelayMs: 1_000,
  maxDelayMs: 30_000,
  periodMs: 5 * 60_000,
};

/** Why a sweep ended before walking everything. */
export type SweepEnd = 'stop' | 'max_duration' | 'replica_lag';

const ENDINGS: Record<SweepEnd | 'complete', string> = {
  complete: 'finished',
  stop: 'interrupted',
  max_duration: 'ended at SWEEP_MAX_DURATION',
  replica_lag: 'ended by a replica that stayed behind',
};

/** One sweep's walks: dry or not, the signal that ends them and why, the replica gate. */
interface Walk {
  dryRun: boolean;
  signal: AbortSignal;
  /** Why the signal ended the walk, or null while it has not. */
  ended: () => SweepEnd | null;
  gate: ReplicaGate | null;
  throttledBy: () => ReplicaLag | null;
  /** Clears the window's timer and lets go of the stop signal. */
  close: () => void;
}

/** A page range whose batch left `rows` dead rows locked. */
interface LockedRange extends TidRange {
  rows: number;
}

/**
 * The advisory lock key, in the two-integer form so it cannot collide with an application
 * that uses the one-bigint form. 0x746b7270 spells "tkrp"; object 1 is the sweep.
 */
export const SWEEP_LOCK = { classId: 0x746b7270, objectId: 1 } as const;

export interface SweeperDependencies {
  pool: DatabasePool;
  config: Pick<
    Config,
    | 'targets'
    | 'naiveTimestampsTimezone'
    | 'sweep'
    | 'databaseUrl'
    | 'listenDatabaseUrl'
    | 'statementTimeoutMs'
    | 'purge'
  >;
  logger: Logger;
  events?: ReaperEvents;
  lockedRowsRetry?: LockedRowsRetry;
  /**
   * SWEEP_MAX_REPLICA_LAG: how long one pause may last before the sweep ends as partial;
   * default the longer of MAX_PAUSE_MS and three times the limit.
   */
  maxReplicaPauseMs?: number;
  /**
   * The rules to sweep, read at each sweep; default config.targets. A daemon passes its rules
   * pinned to the tables it resolved at start (schema.ts, pinnedRule).
   */
  targets?: () => readonly TargetRule[];
}

const rowsIn = (ranges: readonly LockedRange[]) =>
  ranges.reduce((sum, range) => sum + range.rows, 0);

export function createSweeper({
  pool,
  config,
  logger,
  events = createReaperEvents(),
  lockedRowsRetry = LOCKED_ROWS_RETRY,
  maxReplicaPauseMs,
  targets = () => config.targets,
}: SweeperDependencies): Sweeper {
  const log = logger.child('sweep');
  const abort = new AbortController();
  let running: { trigger: SweepTrigger; outcome: Promise<SweepOutcome> } | null = null;
  let retrying: { controller: AbortController; done: Promise<void> } | null = null;

  const skip = (trigger: SweepTrigger, reason: string): SweepOutcome => {
    log.info('sweep.skipped', `sweep skipped: ${reason}`, { trigger, reason });
    return { status: 'skipped', trigger, reason };
  };

  const onBatch =
    (
      shape: TableShape,
      dryRun: boolean,
      progress: ProgressTracker,
      locked: LockedRange[],
      durations: number[],
    ) =>
    (batch: BatchReport) => {
      durations.push(batch.durationMs);
      progress.batch(batch.toPage - batch.fromPage, dryRun ? 0 : batch.rows);
      const { relation, fromPage, toPage, skipped } = batch;
      if (skipped > 0) locked.push({ shape, relation, fromPage, toPage, rows: skipped });
      log.debug('sweep.batch', 'batch done', {
        table: qualifiedName(relation),
        fromPage,
        toPage,
        [dryRun ? 'wouldDelete' : 'deleted']: batch.rows,
        ...(skipped > 0 ? { skipped } : {}),
        durationMs: batch.durationMs,
      });
    };

  // A table partitioned by expiry drops whole partitions; anything else is walked by TID
  // ranges, a partitioned table one leaf at a time.
  const sweepTable = async (shape: TableShape, walk: Walk) => {
    // With a grace on a boolean column, a revoked row's time must be known before the sweep
    // can tell whether its grace has passed: rows revoked while no NOTIFY was heard get the
    // time they are first seen. Afterwards, the records of rows now gone are forgotten.
    const recording = recordsRevocationTimes(shape) && !walk.dryRun;
    if (recording) {
      for (const leaf of shape.leaves) await recordUnseenRevocations(pool, shape, leaf);
    }
    const progress = trackProgress(qualifiedName(shape.relation), log, events, walk.throttledBy);
    const locked: LockedRange[] = [];
    const durations: number[] = [];
    try {
      const result = await sweepTableWith(shape, walk, {
        onBatch: onBatch(shape, walk.dryRun, progress, locked, durations),
        onStart: progress.addPages,
      });
      return { ...result, locked, durations };
    } finally {
      progress.stop();
      if (recording) await forgetRevocations(pool, shape);
    }
  };

  const sweepTableWith = async (
    shape: TableShape,
    walk: Walk,
    callbacks: Required<Pick<TidRangeWalk, 'onBatch' | 'onStart'>>,
  ) => {
    const settings = {
      ...callbacks,
      pool,
      pacer: createPacer({
        startPages: config.sweep.batchPages,
        targetMs: config.sweep.batchTargetMs,
        pauseRatio: config.sweep.pauseRatio,
      }),
      gate: walk.gate,
      concurrency: config.sweep.concurrency,
      signal: walk.signal,
    };
    // A dry run reads everything and moves no position.
    const positions = walk.dryRun
      ? null
      : await readPositions(pool, shape, warnPositionsUnavailable);
    if (shape.partitionedByExpiry) {
      const partitions = await sweepPartitions({
        ...settings,
        shape,
        positions,
        config: config.sweep.partitions,
        dryRun: walk.dryRun,
        logger,
      });
      const complete = !walk.signal.aborted;
      if (complete) await positions?.complete();
      return {
        rows: partitions.rows,
        batches: partitions.batches,
        partitions: partitions.report,
        complete,
        resumedFromPage: 0,
      };
    }
    let rows = 0;
    let batches = 0;
    let complete = true;
    let resumedFromPage = 0;
    for (const leaf of shape.leaves) {
      if (walk.signal.aborted) {
        complete = false;
        break;
      }
      const walked = await walkTidRanges({
        ...settings,
        shape,
        relation: leaf,
        positions,
        mode: walk.dryRun ? 'count' : 'delete',
      });
      rows += walked.rows;
      batches += walked.batches;
      complete &&= walked.complete;
      if (leaf === shape.leaves[0]) resumedFromPage = walked.fromPage;
    }
    if (complete) await positions?.complete();
    return { rows, batches, partitions: null, complete, resumedFromPage };
  };

  // Both warnings come once per process: the fix is an install, and a sweep every night
  // repeating it would bury other lines.
  let positionsWarned = false;
  const warnPositionsUnavailable = (reason: string, error: unknown) => {
    if (positionsWarned) return;
    positionsWarned = true;
    log.warn(
      'sweep.positions_unavailable',
      `${qualifiedName(POSITIONS)} ${reason}, so an unfinished sweep cannot be resumed and the next one starts again from page 0`,
      { table: qualifiedName(POSITIONS), reason, error },
    );
  };
  let lagWarned = false;
  const warnLagUnreadable = () => {
    if (lagWarned) return;
    lagWarned = true;
    log.warn(
      'sweep.replica_lag_unreadable',
      "SWEEP_MAX_REPLICA_LAG is set, but this role cannot read the replicas' positions (it needs pg_read_all_stats, part of pg_monitor), so the sweep does not wait for them. Grant it with `GRANT pg_read_all_stats TO <role>;`, or run `token-reaper install --role` with SWEEP_MAX_REPLICA_LAG set.",
      { maxReplicaLagMs: config.sweep.maxReplicaLagMs },
    );
  };

  const logFinished = (outcome: SweepOutcome & { status: 'finished' }) => {
    const wouldDelete = Object.values(outcome.tables).reduce(
      (sum, table) => sum + (table.wouldDelete ?? 0),
      0,
    );
    log.info(
      'sweep.finished',
      outcome.dryRun
        ? `dry run finished: ${wouldDelete} rows would be deleted`
        : `sweep ${ENDINGS[outcome.endedBy ?? 'complete']}: ${outcome.deleted} rows deleted in ${outcome.durationMs} ms` +
            (outcome.partial ? '; the next sweep resumes where this one stopped' : '') +
            (outcome.skipped > 0
              ? `; ${outcome.skipped} dead rows locked by other transactions are left for a retry`
              : ''),
      {
        trigger: outcome.trigger,
        deleted: outcome.deleted,
        skipped: outcome.skipped,
        durationMs: outcome.durationMs,
        batchDurationMs: outcome.batchDurationMs,
        tables: outcome.tables,
        ...(outcome.dryRun ? { dryRun: true, wouldDelete } : {}),
        ...(outcome.interrupted ? { interrupted: true } : {}),
        ...(outcome.partial ? { partial: true, endedBy: outcome.endedBy } : {}),
      },
    );
  };

  /** The rows of each table still locked in `ranges`, keyed like sweep.finished's tables. */
  const rowsByTable = (ranges: readonly LockedRange[]) => {
    const tables: Record<string, number> = {};
    for (const range of ranges) {
      const table = qualifiedName(range.shape.relation);
      tables[table] = (tables[table] ?? 0) + range.rows;
    }
    return tables;
  };

  // Never throws: like a sweep, a retry ends in a log line whatever happens.
  const retryLockedRows = async (ranges: readonly LockedRange[], signal: AbortSignal) => {
    const deadline = performance.now() + lockedRowsRetry.periodMs;
    let pending = ranges;
    for (let attempt = 1; pending.length > 0; attempt += 1) {
      const skipped = rowsIn(pending);
      const leftFields = { skipped, tables: rowsByTable(pending) };
      const timeLeft = deadline - performance.now();
      if (timeLeft <= 0) {
        log.warn(
          'sweep.retry_gave_up',
          `${skipped} dead rows were still locked by other transactions after ${Math.round(lockedRowsRetry.periodMs / 1000)} s of retries; the next sweep deletes them`,
          { ...leftFields, attempts: attempt - 1, retryPeriodMs: lockedRowsRetry.periodMs },
        );
        return;
      }
      const backoff = Math.min(
        lockedRowsRetry.maxDelayMs,
        lockedRowsRetry.firstDelayMs * 2 ** (attempt - 1),
      );
      const wait = Math.min(timeLeft, jittered(backoff));
      const waited = await delay(wait, true, { signal }).catch(() => false);
      if (!waited || signal.aborted) {
        log.info(
          'sweep.retry_stopped',
          `the retry of ${skipped} locked rows stopped (${String(signal.reason)}); the next sweep deletes what is left`,
          { ...leftFields, reason: String(signal.reason) },
        );
        return;
      }
      const retryStarted = performance.now();
      const stillLocked: LockedRange[] = [];
      let deleted = 0;
      const deletedByTable: Record<string, number> = {};
      try {
        for (const [index, range] of pending.entries()) {
          // Stops between ranges; the next turn of the loop reports it.
          if (signal.aborted) {
            stillLocked.push(...pending.slice(index));
            break;
          }
          const result = await deleteTidRange(pool, range);
          deleted += result.rows;
          const table = qualifiedName(range.shape.relation);
          deletedByTable[table] = (deletedByTable[table] ?? 0) + result.rows;
          if (result.skipped > 0) stillLocked.push({ ...range, rows: result.skipped });
        }
      } catch (error) {
        log.warn(
          'sweep.retry_failed',
          `the retry of ${skipped} locked rows failed; the next sweep deletes them`,
          { ...leftFields, attempt, error },
        );
        return;
      }
      pending = stillLocked;
      events.emit('sweepRetry', { attempt, deleted: deletedByTable, skipped: rowsIn(pending) });
      log.info(
        'sweep.retry',
        `retry ${attempt} of the rows locked during the sweep: ${deleted} deleted, ${rowsIn(pending)} still locked`,
        {
          attempt,
          deleted,
          skipped: rowsIn(pending),
          tables: rowsByTable(pending),
          durationMs: Math.round(performance.now() - retryStarted),
        },
      );
    }
  };

  const startRetrying = (ranges: readonly LockedRange[]) => {
    const controller = new AbortController();
    const current = {
      controller,
      done: retryLockedRows(ranges, controller.signal).finally(() => {
        if (retrying === current) retrying = null;
      }),
    };
    retrying = current;
  };

  const stopRetrying = async (reason: string) => {
    const current = retrying;
    current?.controller.abort(reason);
    await current?.done;
  };

  /**
   * What every walk of one sweep shares: the signal that ends it (a stop, the end of its
   * SWEEP_MAX_DURATION window, or a replica that stays behind too long) and the replica gate.
   * Its own controller and timer, not AbortSignal.any with AbortSignal.timeout: Node holds
   * the sources of AbortSignal.any weakly, and a garbage collection can take the timeout
   * signal, and the window with it (nodejs/node#57736).
   */
  const startWalk = (dryRun: boolean): Walk => {
    const { maxDurationMs, maxReplicaLagMs } = config.sweep;
    const controller = new AbortController();
    let ended: SweepEnd | null = null;
    const end = (reason: SweepEnd) => {
      ended ??= reason;
      controller.abort(reason);
    };
    const onStop = () => end('stop');
    if (abort.signal.aborted) onStop();
    abort.signal.addEventListener('abort', onStop);
    const window =
      maxDurationMs === null ? null : setTimeout(() => end('max_duration'), maxDurationMs);
    window?.unref();
    const gate =
      maxReplicaLagMs === null || dryRun
        ? null
        : createReplicaGate({
            pool,
            maxLagMs: maxReplicaLagMs,
            ownSlot: config.purge.walSlot,
            logger: log,
            events,
            onUnreadable: warnLagUnreadable,
            maxPauseMs: maxReplicaPauseMs ?? Math.max(MAX_PAUSE_MS, 3 * maxReplicaLagMs),
            onGaveUp: (lag, pausedMs) => {
              log.warn(
                'sweep.throttle_gave_up',
                `${lag.source} has been more than SWEEP_MAX_REPLICA_LAG behind for ${Math.round(pausedMs / 1000)} s; the sweep ends here, and the next one resumes where it stopped`,
                { ...lag, pausedMs, maxLagMs: maxReplicaLagMs },
              );
              end('replica_lag');
            },
          });
    return {
      dryRun,
      signal: controller.signal,
      ended: () => ended,
      gate,
      throttledBy: () => gate?.throttledBy() ?? null,
      close: () => {
        if (window !== null) clearTimeout(window);
        abort.signal.removeEventListener('abort', onStop);
      },
    };
  };

  const run = async (trigger: SweepTrigger, dryRun: boolean): Promise<SweepOutcome> => {
    const started = performance.now();
    const lockedRanges: LockedRange[] = [];
    const elapsed = () => Math.round(performance.now() - started);
    try {
      // A dry run deletes nothing, so it needs no lock and never waits on another sweep.
      const lock = dryRun
        ? null
        : await trySessionLock(config, logger, SWEEP_LOCK, `${APPLICATION_NAME}-sweep`);
      if (!dryRun && lock === null) {
        return skip(trigger, 'another token-reaper is sweeping this database');
      }
      // This sweep walks the retried ranges again, and finds what is still locked itself.
      if (!dryRun) await stopRetrying('a new sweep started');
      let outcome: SweepOutcome;
      let walk: Walk | null = null;
      try {
        log.info('sweep.started', dryRun ? 'dry run started' : 'sweep started', {
          trigger,
          dryRun,
        });
        walk = startWalk(dryRun);
        const tables: Record<string, TableSweepResult> = {};
        const durations: number[] = [];
        let deleted = 0;
        let skipped = 0;
        let partial = false;
        for (const rule of targets()) {
          if (walk.signal.aborted) {
            partial = true;
            break;
          }
          const tableStarted = performance.now();
          // Described again for every sweep: partitions come and go, tables are converted.
          const shape = await describeTarget(pool, rule, config);
          if (shape === null) continue;
          const result = await sweepTable(shape, walk);
          partial ||= !result.complete;
          durations.push(...result.durations);
          const tableSkipped = rowsIn(result.locked);
          deleted += dryRun ? 0 : result.rows;
          skipped += tableSkipped;
          lockedRanges.push(...result.locked);
          tables[qualifiedName(shape.relation)] = {
            deleted: dryRun ? 0 : result.rows,
            skipped: tableSkipped,
            ...(dryRun ? { wouldDelete: result.rows } : {}),
            batches: result.batches,
            batchDurationMs: distribution(result.durations),
            ...(result.resumedFromPage > 0 ? { resumedFromPage: result.resumedFromPage } : {}),
            complete: result.complete,
            partitionsDropped: result.partitions?.partitionsDropped ?? 0,
            durationMs: Math.round(performance.now() - tableStarted),
            ...(result.partitions ? { partitions: result.partitions } : {}),
          };
        }
        const endedBy = walk.ended();
        outcome = {
          status: 'finished',
          trigger,
          dryRun,
          interrupted: endedBy === 'stop',
          partial,
          ...(partial && endedBy !== null ? { endedBy } : {}),
          deleted,
          skipped,
          durationMs: elapsed(),
          batchDurationMs: distribution(durations),
          tables,
        };
      } finally {
        walk?.close();
        await lock?.release();
      }
      // Logged once the lock and the connection are released: a request that reads this
      // line and asks for another sweep gets a new one, not the tail of this one.
      if (outcome.status === 'finished') {
        logFinished(outcome);
        if (lockedRanges.length > 0 && !abort.signal.aborted) startRetrying(lockedRanges);
      }
      return outcome;
    } catch (error) {
      const durationMs = elapsed();
      log.error('sweep.failed', 'sweep failed; the next sweep will try again', {
        trigger,
        error,
        durationMs,
      });
      return { status: 'failed', trigger, error, durationMs };
    }
  };

  return {
    sweep(trigger, options = {}) {
      if (abort.signal.aborted) {
        const skipped = skip(trigger, 'token-reaper is stopping');
        events.emit('sweep', skipped);
        return Promise.resolve(skipped);
      }
      if (running) {
        log.info('sweep.joined', `a sweep is already running; this ${trigger} request joins it`, {
          trigger,
          runningTrigger: running.trigger,
        });
        return running.outcome;
      }
      const outcome = run(trigger, options.dryRun ?? false)
        .then((result) => {
          events.emit('sweep', result);
          return result;
        })
        .finally(() => {
          running = null;
        });
      running = { trigger, outcome };
      return outcome;
    },
    retrySettled: () => retrying?.done ?? Promise.resolve(),
    async stop() {
      abort.abort();
      await running?.outcome;
      await stopRetrying('token-reaper is stopping');
    },
  };
}
