// One sweep at a time, everywhere. Within the process a request that arrives while a sweep
// runs joins it instead of starting another (node-cron's own noOverlap does not cover
// task.execute(), and SIGUSR1 bypasses node-cron entirely). Across replicas a session-level
// advisory lock decides: the replica that does not get it logs `sweep.skipped`. The lock
// lives on a connection held for the whole sweep, so a crashed replica releases it with its
// connection.
//
// A sweep never throws: every failure ends as a `sweep.failed` line and a resolved outcome,
// so nothing can escape into node-cron or a signal handler and crash the daemon.
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import type { Config } from '../config.js';
import { createReaperEvents, type ReaperEvents } from '../events.js';
import type { Logger } from '../logger.js';
import { forgetRevocations, recordUnseenRevocations } from '../revocations.js';
import {
  describeTarget,
  qualifiedName,
  recordsRevocationTimes,
  type TableShape,
} from '../schema.js';
import { sweepPartitions, type PartitionReport } from './partitions.js';
import { trackProgress, type ProgressTracker } from './progress.js';
import { walkTidRanges, type BatchReport } from './tid-range.js';

export type SweepTrigger = 'schedule' | 'signal' | 'cli' | 'api';

export interface SweepOptions {
  /** Count what would be deleted, delete nothing. */
  dryRun?: boolean;
}

export interface TableSweepResult {
  deleted: number;
  /** Dry runs only: the rows a real sweep would delete now. */
  wouldDelete?: number;
  batches: number;
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
      deleted: number;
      durationMs: number;
      tables: Record<string, TableSweepResult>;
    }
  | { status: 'skipped'; trigger: SweepTrigger; reason: string }
  | { status: 'failed'; trigger: SweepTrigger; error: unknown; durationMs: number };

export interface Sweeper {
  sweep(trigger: SweepTrigger, options?: SweepOptions): Promise<SweepOutcome>;
  /** Stops a running sweep between batches and waits for it; later requests are skipped. */
  stop(): Promise<void>;
}

/**
 * The advisory lock key, in the two-integer form so it cannot collide with an application
 * that uses the one-bigint form. 0x746b7270 spells "tkrp"; object 1 is the sweep.
 */
export const SWEEP_LOCK = { classId: 0x746b7270, objectId: 1 } as const;

export interface SweeperDependencies {
  pool: DatabasePool;
  config: Pick<Config, 'targets' | 'naiveTimestampsTimezone' | 'sweep'>;
  logger: Logger;
  events?: ReaperEvents;
}

const lockedRow = z.object({ locked: z.boolean() });

export function createSweeper({
  pool,
  config,
  logger,
  events = createReaperEvents(),
}: SweeperDependencies): Sweeper {
  const log = logger.child('sweep');
  const abort = new AbortController();
  let running: { trigger: SweepTrigger; outcome: Promise<SweepOutcome> } | null = null;

  const skip = (trigger: SweepTrigger, reason: string): SweepOutcome => {
    log.info('sweep.skipped', `sweep skipped: ${reason}`, { trigger, reason });
    return { status: 'skipped', trigger, reason };
  };

  const onBatch = (dryRun: boolean, progress: ProgressTracker) => (batch: BatchReport) => {
    progress.batch(batch.toPage - batch.fromPage, dryRun ? 0 : batch.rows);
    log.debug('sweep.batch', 'batch done', {
      table: qualifiedName(batch.relation),
      fromPage: batch.fromPage,
      toPage: batch.toPage,
      [dryRun ? 'wouldDelete' : 'deleted']: batch.rows,
      durationMs: batch.durationMs,
    });
  };

  // A table partitioned by expiry drops whole partitions; anything else is walked by TID
  // ranges, a partitioned table one leaf at a time.
  const sweepTable = async (shape: TableShape, dryRun: boolean) => {
    // With a grace on a boolean column, a revoked row's time must be known before the sweep
    // can tell whether its grace has passed: rows revoked while no NOTIFY was heard get the
    // time they are first seen. Afterwards, the records of rows now gone are forgotten.
    const recording = recordsRevocationTimes(shape) && !dryRun;
    if (recording) {
      for (const leaf of shape.leaves) await recordUnseenRevocations(pool, shape, leaf);
    }
    const progress = trackProgress(qualifiedName(shape.relation), log, events);
    try {
      return await sweepTableWith(shape, dryRun, progress);
    } finally {
      progress.stop();
      if (recording) await forgetRevocations(pool, shape);
    }
  };

  const sweepTableWith = async (shape: TableShape, dryRun: boolean, progress: ProgressTracker) => {
    const settings = {
      pool,
      batchPages: config.sweep.batchPages,
      concurrency: config.sweep.concurrency,
      signal: abort.signal,
      onBatch: onBatch(dryRun, progress),
      onStart: progress.addPages,
    };
    if (shape.partitionedByExpiry) {
      const partitions = await sweepPartitions({
        ...settings,
        shape,
        config: config.sweep.partitions,
        dryRun,
        logger,
      });
      return { rows: partitions.rows, batches: partitions.batches, partitions: partitions.report };
    }
    let rows = 0;
    let batches = 0;
    for (const leaf of shape.leaves) {
      const walked = await walkTidRanges({
        ...settings,
        shape,
        relation: leaf,
        mode: dryRun ? 'count' : 'delete',
      });
      rows += walked.rows;
      batches += walked.batches;
    }
    return { rows, batches, partitions: null };
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
        : `sweep ${outcome.interrupted ? 'interrupted' : 'finished'}: ${outcome.deleted} rows deleted in ${outcome.durationMs} ms`,
      {
        trigger: outcome.trigger,
        deleted: outcome.deleted,
        durationMs: outcome.durationMs,
        tables: outcome.tables,
        ...(outcome.dryRun ? { dryRun: true, wouldDelete } : {}),
        ...(outcome.interrupted ? { interrupted: true } : {}),
      },
    );
  };

  const run = async (trigger: SweepTrigger, dryRun: boolean): Promise<SweepOutcome> => {
    const started = performance.now();
    const elapsed = () => Math.round(performance.now() - started);
    try {
      const outcome = await pool.connect(async (connection): Promise<SweepOutcome> => {
        // A dry run deletes nothing, so it needs no lock and never waits on another sweep.
        if (!dryRun) {
          const locked = await connection.oneFirst(sql.type(lockedRow)`
            SELECT pg_try_advisory_lock(${SWEEP_LOCK.classId}, ${SWEEP_LOCK.objectId}) AS locked
          `);
          if (!locked) return skip(trigger, 'another token-reaper is sweeping this database');
        }
        try {
          log.info('sweep.started', dryRun ? 'dry run started' : 'sweep started', {
            trigger,
            dryRun,
          });
          const tables: Record<string, TableSweepResult> = {};
          let deleted = 0;
          for (const rule of config.targets) {
            if (abort.signal.aborted) break;
            const tableStarted = performance.now();
            // Described again for every sweep: partitions come and go, tables are converted.
            const shape = await describeTarget(connection, rule, config);
            if (shape === null) continue;
            const result = await sweepTable(shape, dryRun);
            deleted += dryRun ? 0 : result.rows;
            tables[qualifiedName(shape.relation)] = {
              deleted: dryRun ? 0 : result.rows,
              ...(dryRun ? { wouldDelete: result.rows } : {}),
              batches: result.batches,
              partitionsDropped: result.partitions?.partitionsDropped ?? 0,
              durationMs: Math.round(performance.now() - tableStarted),
              ...(result.partitions ? { partitions: result.partitions } : {}),
            };
          }
          const finished: SweepOutcome = {
            status: 'finished',
            trigger,
            dryRun,
            interrupted: abort.signal.aborted,
            deleted,
            durationMs: elapsed(),
            tables,
          };
          return finished;
        } finally {
          if (!dryRun) {
            // If the connection is gone, so is its lock; nothing to report then.
            await connection
              .query(
                sql.unsafe`SELECT pg_advisory_unlock(${SWEEP_LOCK.classId}, ${SWEEP_LOCK.objectId})`,
              )
              .catch(() => undefined);
          }
        }
      });
      // Logged once the lock and the connection are released: a request that reads this
      // line and asks for another sweep gets a new one, not the tail of this one.
      if (outcome.status === 'finished') logFinished(outcome);
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
    async stop() {
      abort.abort();
      await running?.outcome;
    },
  };
}
