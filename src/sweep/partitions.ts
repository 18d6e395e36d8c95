// The strategy for a table RANGE-partitioned on its expiry column. A partition whose upper
// bound is at or before now() holds only expired rows, so it goes whole: one DROP TABLE
// costs the same whatever its size, leaves no bloat and writes almost no WAL (DESIGN.md
// measured 6 ms a partition). What stays is cleaned as cheaply as it can be:
// - revoked rows in live partitions, through the partial index on revoked rows; scanning
//   every live partition for a few revoked rows would more than double the sweep;
// - expired rows in the partition that holds now(), and in the default partition, by
//   TID-range batches (only those partitions can hold expired rows at all).
// And partitions are made ahead, so that an insert never fails and never lands in the
// default partition.
//
// Every DDL here takes ACCESS EXCLUSIVE on the parent and on the default partition (measured
// on PostgreSQL 15), and a waiting ACCESS EXCLUSIVE request makes every later query on the
// table queue behind it. The failures of pg_partman and TimescaleDB retention are exactly
// that. So each DDL is its own transaction under a short lock_timeout: while a long auth
// transaction holds the table, the DDL gives up within the timeout, the auth traffic that
// queued behind it goes on, and the DDL is tried again after a backoff, or left for the next
// sweep and reported.
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import type { PartitionConfig } from '../config.js';
import type { Logger } from '../logger.js';
import {
  expiryColumnName,
  qualifiedName,
  regclassOf,
  relationIdentifier,
  type Relation,
  type TableShape,
} from '../schema.js';
import { instantOfBoundText, instantOfValue, type TimeReading } from '../targets/time.js';
import { retryOnLockTimeout } from '../retry.js';
import { deleteMarkedRows } from './marked-rows.js';
import type { Pacer } from './pacing.js';
import type { SweepPositions } from './positions.js';
import type { ReplicaGate } from './replica-lag.js';
import { walkTidRanges, type BatchReport } from './tid-range.js';

export interface Partition extends Relation {
  isDefault: boolean;
  /**
   * Epoch milliseconds; null for the default. MINVALUE reads as -Infinity and MAXVALUE as
   * Infinity: for the partitions made ahead, they mean what '-infinity' and 'infinity' mean.
   */
  lower: number | null;
  upper: number | null;
  /** Every row is expired: the upper bound is at or before now() on the database clock. */
  expired: boolean;
  /** The partition that holds now(). */
  current: boolean;
  /** pg_class.reltuples: the planner's estimate, -1 never analyzed. */
  estimatedRows: number;
}

/** What the partition strategy did besides deleting rows; sweep.finished carries it. */
export interface PartitionReport {
  partitionsDropped: number;
  partitionsDetached: number;
  partitionsCreated: string[];
  /** Expired partitions whose lock did not come in time; the next sweep tries again. */
  partitionsSkipped: string[];
  /** The planner's estimate of the rows that went with the dropped or detached partitions. */
  estimatedRowsInRemovedPartitions: number;
  /** Dry runs: the partitions a sweep would drop or detach now, and make ahead. */
  partitionsToRemove?: string[];
  partitionsToCreate?: string[];
  /** Rows found in the default partition after the sweep. */
  rowsInDefaultPartition: number;
}

export interface PartitionSweepResult {
  /** Rows deleted (or counted, in a dry run) by DELETE, outside the removed partitions. */
  rows: number;
  batches: number;
  report: PartitionReport;
}

export interface PartitionSweep {
  pool: DatabasePool;
  shape: TableShape;
  config: PartitionConfig;
  pacer: Pacer;
  gate: ReplicaGate | null;
  /** Where an unfinished walk of the current and default partitions stopped (positions.ts). */
  positions: SweepPositions | null;
  concurrency: number;
  dryRun: boolean;
  signal: AbortSignal;
  logger: Logger;
  onBatch: (batch: BatchReport) => void;
  onStart: (pages: number) => void;
}

const DAY_MS = 86_400_000;
/** A margin of days on top of the longest token lifetime stored, for the premake horizon. */
export const PREMAKE_MARGIN_DAYS = 7;
/**
 * The longest token lifetime a stored expiry is taken for. An expiry further ahead is no
 * lifetime but a way to say "never" ('9999-12-31', an integer's maximum), like 'infinity':
 * making partitions up to it would mean millions of them. Such rows stay in the default
 * partition. PARTITION_PREMAKE_DAYS makes partitions further ahead for tokens that really
 * live longer.
 */
export const LONGEST_INFERRED_LIFETIME_DAYS = 400;

/**
 * How many days of partitions to keep ahead of now(): PARTITION_PREMAKE_DAYS, or the longest
 * token lifetime stored (the furthest expiry from now) plus a margin. The sweep and the
 * conversion both use it, so the first sweep after a conversion finds what it would make.
 */
export function premakeHorizonDays(premakeDays: number | null, longestLifetimeMs: number) {
  return (
    premakeDays ??
    Math.max(PREMAKE_MARGIN_DAYS, Math.ceil(longestLifetimeMs / DAY_MS) + PREMAKE_MARGIN_DAYS)
  );
}

/** The database clock, and the longest token lifetime stored; both in milliseconds. */
export interface LifetimeReading {
  now: number;
  /** 0 when no row expires within LONGEST_INFERRED_LIFETIME_DAYS from now. */
  longestLifetimeMs: number;
}

/**
 * How far ahead of now the latest expiry stored lies, counting only the expiries that can be
 * a token's lifetime: in the future, and at most LONGEST_INFERRED_LIFETIME_DAYS away. Past,
 * infinite and far-future ones say nothing about how far ahead partitions are needed.
 */
export async function readLongestLifetime(
  pool: DatabasePool,
  shape: Pick<TableShape, 'relation' | 'expiry'>,
): Promise<LifetimeReading> {
  const reading = keyReading(shape);
  const column = sql.identifier([expiryColumnName(shape)!]);
  const instant = instantOfValue(column, reading);
  return pool.one(sql.type(z.object({ now: z.number(), longestLifetimeMs: z.number() }))`
    SELECT (extract(epoch FROM now()) * 1000)::float8 AS now,
           coalesce((extract(epoch FROM ${instantOfValue(sql.fragment`latest`, reading)} - now()) * 1000)::float8, 0)
             AS "longestLifetimeMs"
    -- max() of the column itself, which the expiry index answers by walking down from the
    -- top past the few rows that say "never"; the reading is monotonic, so the latest value
    -- is the latest instant.
    FROM (SELECT max(${column}) AS latest FROM ${relationIdentifier(shape.relation)}
          WHERE ${instant} > now()
            AND ${instant} <= now() + make_interval(days => ${LONGEST_INFERRED_LIFETIME_DAYS})) latest
  `);
}

const partitionRow = z.object({
  schema: z.string(),
  name: z.string(),
  isDefault: z.boolean(),
  lower: z.number().nullable(),
  upper: z.number().nullable(),
  expired: z.boolean(),
  current: z.boolean(),
  estimatedRows: z.number(),
});

/** How the partition key (the expiry column) is read: only time columns partition by expiry. */
export function keyReading(shape: Pick<TableShape, 'expiry'>): TimeReading {
  if (shape.expiry?.kind !== 'column')
    throw new Error('a table partitioned by expiry has an expiry column');
  return shape.expiry.time.reading;
}

/** The direct partitions with their bounds, read on the database clock. */
export async function listPartitions(pool: DatabasePool, shape: TableShape): Promise<Partition[]> {
  // pg_get_expr prints a timestamptz bound as `FOR VALUES FROM ('…') TO ('…')` in this
  // session's TimeZone, and casting it back in the same session gives the exact instant; a
  // naive bound is a wall-clock time, read in the declared zone like the column's values.
  const reading = keyReading(shape);
  const keep = shape.keepExpiredForSeconds;
  const partitions = await pool.any(sql.type(partitionRow)`
    WITH bounds AS (
      SELECT n.nspname AS schema, c.relname AS name, c.reltuples,
             c.relpartbound IS NOT NULL AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
             substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \\((.*)\\) TO \\(') AS lower_text,
             substring(pg_get_expr(c.relpartbound, c.oid) FROM ' TO \\((.*)\\)$') AS upper_text
      FROM pg_catalog.pg_inherits i
      JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE i.inhparent = ${regclassOf(shape.relation)}
    ), typed AS (
      SELECT schema, name, is_default, reltuples,
             CASE WHEN lower_text IN ('MINVALUE') OR lower_text IS NULL THEN NULL
                  ELSE ${instantOfBoundText(sql.fragment`btrim(lower_text, '''')`, reading)} END AS lower_bound,
             CASE WHEN upper_text IN ('MAXVALUE') OR upper_text IS NULL THEN NULL
                  ELSE ${instantOfBoundText(sql.fragment`btrim(upper_text, '''')`, reading)} END AS upper_bound
      FROM bounds
    )
    SELECT schema, name, is_default AS "isDefault",
           CASE WHEN NOT is_default
                THEN coalesce((extract(epoch FROM lower_bound) * 1000)::float8, '-Infinity') END AS lower,
           CASE WHEN NOT is_default
                THEN coalesce((extract(epoch FROM upper_bound) * 1000)::float8, 'Infinity') END AS upper,
           -- Expired: every row's expiry, plus the time expired rows are kept, has passed.
           coalesce(NOT is_default AND upper_bound <= now() - make_interval(secs => ${keep}), false)
             AS expired,
           -- Current: the partitions that can hold both rows past that and rows not yet.
           coalesce(NOT is_default AND (lower_bound IS NULL OR lower_bound <= now())
                    AND (upper_bound IS NULL OR upper_bound > now() - make_interval(secs => ${keep})),
                    false) AS current,
           reltuples::float8 AS "estimatedRows"
    FROM typed
    ORDER BY upper_bound NULLS LAST, name
  `);
  return [...partitions];
}

export async function sweepPartitions(sweep: PartitionSweep): Promise<PartitionSweepResult> {
  const { pool, shape, config, dryRun, signal } = sweep;
  const log = sweep.logger.child('sweep');
  const table = qualifiedName(shape.relation);
  const parent = relationIdentifier(shape.relation);
  const partitions = await listPartitions(pool, shape);
  const expired = partitions.filter((partition) => partition.expired);
  let rows = 0;
  let batches = 0;
  const result: PartitionReport = {
    partitionsDropped: 0,
    partitionsDetached: 0,
    partitionsCreated: [],
    partitionsSkipped: [],
    estimatedRowsInRemovedPartitions: 0,
    rowsInDefaultPartition: 0,
  };

  // 1. Expired partitions go whole, each in its own short transaction.
  if (dryRun) {
    result.partitionsToRemove = expired.map(qualifiedName);
  } else {
    for (const partition of expired) {
      if (signal.aborted) break;
      const statement =
        config.expiredAction === 'detach'
          ? sql.unsafe`ALTER TABLE ${parent} DETACH PARTITION ${relationIdentifier(partition)}`
          : sql.unsafe`DROP TABLE ${relationIdentifier(partition)}`;
      const done = await withLockTimeout(pool, config, statement, log, {
        table,
        partition: qualifiedName(partition),
        action: config.expiredAction,
      });
      if (!done) {
        result.partitionsSkipped.push(qualifiedName(partition));
        continue;
      }
      if (config.expiredAction === 'detach') result.partitionsDetached += 1;
      else result.partitionsDropped += 1;
      result.estimatedRowsInRemovedPartitions += Math.max(0, partition.estimatedRows);
      log.debug('sweep.partition_removed', `${config.expiredAction} ${qualifiedName(partition)}`, {
        table,
        partition: qualifiedName(partition),
        action: config.expiredAction,
      });
    }
  }

  // 2. Partitions ahead, before anything else can fail, so inserts keep their partition.
  const { planned, horizonDays } = await planPartitions(pool, shape, partitions, config);
  if (dryRun) {
    result.partitionsToCreate = planned.map((partition) => partition.name);
  } else {
    for (const partition of planned) {
      if (signal.aborted) break;
      const created = await createPartition(pool, shape, partition, config, log);
      if (!created) break;
      result.partitionsCreated.push(`${shape.relation.schema}.${partition.name}`);
    }
  }

  // 3. Dead rows in what stays. Skipped partitions are left alone: their lock is contended,
  // and the next sweep drops them whole anyway.
  const staying = partitions.filter((partition) => !partition.expired);
  const mode = dryRun ? 'count' : 'delete';
  for (const partition of staying) {
    if (signal.aborted) break;
    if (partition.current || partition.isDefault) {
      // These may hold expired rows too: walk them once for everything dead.
      const walked = await walkTidRanges({
        pool,
        shape,
        relation: partition,
        pacer: sweep.pacer,
        gate: sweep.gate,
        positions: sweep.positions,
        concurrency: sweep.concurrency,
        mode,
        signal,
        onBatch: sweep.onBatch,
        onStart: sweep.onStart,
      });
      rows += walked.rows;
      batches += walked.batches;
    } else {
      const marked = await deleteMarkedRows(pool, shape, partition, {
        mode,
        signal,
        pacing: {
          beforeBatch: async () => sweep.gate?.wait(signal),
          afterBatch: (durationMs) => sweep.pacer.pause(durationMs, signal),
        },
      });
      rows += marked.rows;
      batches += marked.batches;
    }
  }

  const defaultPartition = partitions.find((partition) => partition.isDefault);
  if (defaultPartition) {
    // Rows that expire beyond the partitions made ahead (mostly 'infinity' or a far-off date
    // that means "never") belong there for good; only the others call for partitions.
    const instant = instantOfValue(sql.identifier([expiryColumnName(shape)!]), keyReading(shape));
    const counts = await pool.one(
      sql.type(z.object({ rows: z.number(), beyondHorizon: z.number() }))`
        SELECT count(*)::int AS rows,
               count(*) FILTER (WHERE ${instant} >= now() + make_interval(days => ${horizonDays}))::int
                 AS "beyondHorizon"
        FROM ${relationIdentifier(defaultPartition)}
      `,
    );
    result.rowsInDefaultPartition = counts.rows;
    if (counts.rows > 0) {
      const partition = qualifiedName(defaultPartition);
      const withoutPartition = counts.rows - counts.beyondHorizon;
      log.warn(
        'sweep.default_partition_rows',
        [
          `${partition} holds ${counts.rows} live rows.`,
          ...(withoutPartition > 0
            ? [
                `${withoutPartition} found no partition for their expiry: make partitions further ahead (PARTITION_PREMAKE_DAYS), then move the rows.`,
              ]
            : []),
          ...(counts.beyondHorizon > 0
            ? [
                `${counts.beyondHorizon} expire more than ${horizonDays} days ahead, beyond any partition made ahead ('infinity', or a far-off date that means never): they stay there, and every sweep walks them.`,
              ]
            : []),
        ].join(' '),
        { table, partition, rows: counts.rows, rowsBeyondHorizon: counts.beyondHorizon },
      );
    }
  }
  return { rows, batches, report: result };
}

interface PlannedPartition {
  name: string;
  lower: number;
  upper: number;
}

/**
 * The partitions to make so that the table covers now() + the horizon. They continue the
 * grid of the newest partition: same width (a day, a week, whatever the deployment chose),
 * contiguous, starting at its upper bound, or at the grid step that holds now() when the
 * newest partition is already in the past.
 */
async function planPartitions(
  pool: DatabasePool,
  shape: TableShape,
  partitions: readonly Partition[],
  config: PartitionConfig,
): Promise<{ planned: PlannedPartition[]; horizonDays: number }> {
  const clock = await readLongestLifetime(pool, shape);
  const horizonDays = premakeHorizonDays(config.premakeDays, clock.longestLifetimeMs);
  const horizon = clock.now + horizonDays * DAY_MS;

  const bounded = partitions.filter((partition) => !partition.isDefault);
  const ranged = bounded.filter(
    (partition) => Number.isFinite(partition.lower) && Number.isFinite(partition.upper),
  );
  const newest = ranged.at(-1);
  const width = newest ? newest.upper! - newest.lower! : DAY_MS;
  const planned: PlannedPartition[] = [];
  // A partition that runs on to MAXVALUE or 'infinity' leaves no room to make any; one from
  // 'infinity' on holds only rows that never expire.
  const openEnded = bounded.some(
    (partition) => partition.upper === Infinity && partition.lower !== Infinity,
  );
  if (width <= 0 || openEnded) return { planned, horizonDays };
  // After the newest partition; without one, after the one from MINVALUE or '-infinity'.
  let lower =
    newest?.upper ??
    Math.max(
      Math.floor(clock.now / DAY_MS) * DAY_MS,
      ...bounded.map((partition) => partition.upper!).filter(Number.isFinite),
    );
  if (lower + width <= clock.now) lower += Math.floor((clock.now - lower) / width) * width;

  while (lower < horizon) {
    planned.push({
      name: partitionName(shape.relation.name, lower, width),
      lower,
      upper: lower + width,
    });
    lower += width;
  }
  return { planned, horizonDays };
}

/** `<table>_pYYYYMMDD`, with `_HHMM` for partitions narrower than a day; at most 63 bytes. */
export function partitionName(table: string, lower: number, width: number) {
  const iso = new Date(lower).toISOString();
  const suffix =
    `_p${iso.slice(0, 4)}${iso.slice(5, 7)}${iso.slice(8, 10)}` +
    (width % DAY_MS === 0 ? '' : `_${iso.slice(11, 13)}${iso.slice(14, 16)}`);
  const room = 63 - Buffer.byteLength(suffix);
  return Buffer.from(table).subarray(0, room).toString() + suffix;
}

/**
 * A bound as the partition key's type writes it: an instant for timestamptz, the wall-clock
 * time in the declared zone for a naive key (converted by the database, like every reading).
 */
async function boundLiteral(pool: DatabasePool, epochMs: number, reading: TimeReading) {
  const iso = new Date(epochMs).toISOString();
  if (reading.kind !== 'naive') return iso;
  return pool.oneFirst(sql.type(z.object({ bound: z.string() }))`
    SELECT to_char(${iso}::timestamptz AT TIME ZONE ${reading.zone}::text,
                   'YYYY-MM-DD"T"HH24:MI:SS.US') AS bound
  `);
}

async function createPartition(
  pool: DatabasePool,
  shape: TableShape,
  partition: PlannedPartition,
  config: PartitionConfig,
  log: Logger,
) {
  const name = `${shape.relation.schema}.${partition.name}`;
  const [lower, upper] = await Promise.all(
    [partition.lower, partition.upper].map((bound) => boundLiteral(pool, bound, keyReading(shape))),
  );
  const statement = sql.unsafe`
    CREATE TABLE IF NOT EXISTS ${sql.identifier([shape.relation.schema, partition.name])}
    PARTITION OF ${relationIdentifier(shape.relation)}
    FOR VALUES FROM (${sql.literalValue(lower!)}) TO (${sql.literalValue(upper!)})
  `;
  try {
    // PostgreSQL makes whoever creates a table its owner. Created as the daemon's own role, a
    // partition would not belong to the table's owner, whose migrations (ALTER TABLE … ADD
    // COLUMN recurses into every partition) would then fail with "must be owner". So the
    // partition is created as the owner, when the daemon may SET ROLE to it (install --role
    // makes it a member) and the owner may create tables in the schema.
    const asOwner = sql.unsafe`
      SELECT set_config('role', o.rolname, true)
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
      WHERE c.oid = ${regclassOf(shape.relation)} AND o.rolname <> current_user
        AND pg_catalog.pg_has_role(o.oid, 'MEMBER')
        AND pg_catalog.has_schema_privilege(o.oid, c.relnamespace, 'CREATE')
    `;
    const done = await withLockTimeout(
      pool,
      config,
      statement,
      log,
      {
        table: qualifiedName(shape.relation),
        partition: name,
        action: 'create',
      },
      asOwner,
    );
    if (done) {
      log.debug('sweep.partition_created', `created ${name}`, { partition: name });
    }
    return done;
  } catch (error) {
    // Typically 23514: rows in the default partition already fall into this range.
    log.warn(
      'sweep.partition_create_failed',
      `could not create ${name}; it is retried next sweep`,
      {
        table: qualifiedName(shape.relation),
        partition: name,
        error,
      },
    );
    return false;
  }
}

/**
 * Runs one DDL in a transaction of its own under PARTITION_LOCK_TIMEOUT_MS, retried up to
 * PARTITION_LOCK_ATTEMPTS times (retry.ts). False when it never got its lock: the
 * partition is left for the next sweep.
 */
async function withLockTimeout(
  pool: DatabasePool,
  config: PartitionConfig,
  statement: ReturnType<typeof sql.unsafe>,
  log: Logger,
  context: Record<string, unknown>,
  setup?: ReturnType<typeof sql.unsafe>,
): Promise<boolean> {
  const outcome = await retryOnLockTimeout(
    { lockTimeoutMs: config.lockTimeoutMs, attempts: config.lockAttempts, maxPauseMs: 5_000 },
    () =>
      pool.transaction(async (transaction) => {
        await transaction.query(
          sql.unsafe`SELECT set_config('lock_timeout', ${`${config.lockTimeoutMs}ms`}, true)`,
        );
        if (setup) await transaction.query(setup);
        await transaction.query(statement);
      }),
    ({ attempt, pauseMs }) =>
      log.warn(
        'sweep.lock_timeout',
        pauseMs === null
          ? `gave up on the lock after ${attempt} attempts; the next sweep tries again`
          : `the lock did not come within ${config.lockTimeoutMs} ms; trying again`,
        { ...context, attempt, lockTimeoutMs: config.lockTimeoutMs },
      ),
  );
  return 'value' in outcome;
}
