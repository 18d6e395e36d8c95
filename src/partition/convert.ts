// `token-reaper partition convert`: turns each plain token table into one RANGE-partitioned by
// UTC day of expiry, online and without copying a row (DESIGN.md, "Zero-copy conversion").
//
// The table is not copied: it becomes the first partition of a new partitioned table that
// takes over its name. This legacy partition holds every expiry below a bound, and daily
// partitions follow from the bound on. To attach it, PostgreSQL must know that every row lies
// below the bound. Without help it scans the whole table for that, under a lock that stops the
// auth service; a valid CHECK constraint that says the same lets it skip the scan. So the slow
// work comes first, online, and the swap that follows holds its lock for milliseconds:
//
// 1. CREATE INDEX CONCURRENTLY, while the auth service writes:
//    - a unique index on the primary key's columns plus the expiry. PostgreSQL enforces
//      uniqueness one partition at a time, so a partitioned table's primary key must include
//      the partition key; this index becomes the legacy partition's primary key;
//    - a plain twin of every other unique index that lacks the expiry (token_hash in the
//      reference schema). The partitioned table cannot have that unique index, but its lookups
//      still need an index. The legacy partition keeps the unique one, so uniqueness stays
//      enforced among its rows; across partitions the database no longer enforces it (for
//      token hashes, a collision of 256-bit hashes is not a practical concern).
// 2. CHECK (expires_at < bound), added NOT VALID (a brief lock, under lock_timeout) and then
//    validated, which scans under SHARE UPDATE EXCLUSIVE: reads and writes go on.
// 3. One transaction, under a short lock_timeout and retried after a backoff like every
//    partition DDL (see sweep/partitions.ts): rename the table to <table>_legacy and give it
//    the new key; create the partitioned table under the old name with the same columns,
//    defaults, CHECKs and owner; make the daily partitions from the bound; attach the legacy
//    table FROM (MINVALUE) TO (bound), which the CHECK makes instant; add the primary key and
//    the indexes, which adopt the ones on the legacy table instead of building anything; move
//    the triggers; copy the grants.
//
// Rows that expire at or after the bound ('infinity', '9999-12-31': expiries that mean
// "never", see LONGEST_INFERRED_LIFETIME_DAYS) cannot stay in the legacy partition. The swap
// moves them into a default partition <table>_default just before the attach, in the same
// transaction, so the auth service never misses one. While they are in the table no CHECK
// can prove the bound, so then the attach checks the rows under the lock: the plan warns
// about a big table.
//
// Queries that waited behind the swap look the table's name up again once it commits, so they
// land in the partitioned table; prepared statements are re-planned the same way.
//
// Afterwards the sweep handles the table like any table partitioned by expiry: it walks the
// legacy partition by TID ranges while that partition holds now(), and drops it whole once the
// bound has passed.
//
// Steps 1 and 2 are idempotent and step 3 is atomic, so a run that stopped anywhere is
// finished by running it again.
//
// partition/table-facts.ts reads the table and refuses what cannot be converted safely;
// partition/conversion-plan.ts turns that into SQL; this file runs it.
import type pg from 'pg';
import type { DatabasePool } from 'slonik';
import type { Config, PartitionConfig } from '../config.js';
import { createDatabasePool, createPlainClient } from '../db.js';
import { SchemaError } from '../errors.js';
import { acquireInstallLock, dropInvalidIndex } from '../install.js';
import { retryOnLockTimeout } from '../retry.js';
import { serializeError, type Logger } from '../logger.js';
import {
  formatPlans,
  planConversions,
  planTable,
  shortLockSettings,
  swapPreamble,
  type ConversionPlan,
} from './conversion-plan.js';
import { describeTarget, expiryColumnName, qualifiedName } from '../schema.js';

export interface ConvertOptions {
  config: Config;
  logger: Logger;
  /** Write the plan's SQL to stdout and change nothing. */
  print: boolean;
}

const CHECK_VIOLATION = '23514';

/** Returns the exit code. */
export async function convertToPartitioned(options: ConvertOptions): Promise<number> {
  const { config, print } = options;
  const log = options.logger.child('partition');
  const pool = await createDatabasePool(config, options.logger, { maximumPoolSize: 1 });
  try {
    if (print) {
      const { plans, skipped } = await planConversions(pool, config);
      process.stdout.write(formatPlans(plans, skipped, config.sweep.partitions));
      return 0;
    }
    const client = createPlainClient(config, options.logger);
    await client.connect();
    try {
      // One change of schema at a time: partition convert takes install's advisory lock, so
      // that neither builds or renames indexes under the other, and a second conversion waits
      // for the first and then finds the table partitioned.
      await acquireInstallLock(client, log);
      const { plans, skipped } = await planConversions(pool, config);
      for (const reason of skipped) log.info('partition.skipped', reason);
      for (const plan of plans) await convertTable(pool, client, plan, config, log);
    } finally {
      await client.end();
    }
    return 0;
  } finally {
    await pool.end();
  }
}

async function convertTable(
  pool: DatabasePool,
  client: pg.Client,
  initialPlan: ConversionPlan,
  config: Config,
  log: Logger,
) {
  const settings = config.sweep.partitions;
  const started = performance.now();
  let plan = initialPlan;
  const table = plan.table;
  for (const warning of plan.warnings) {
    log.warn('partition.warning', warning, { table });
  }

  for (const build of plan.indexBuilds) {
    await step(log, table, 'build_index', { index: build.index.name }, async () => {
      await dropInvalidIndex(client, build.index, log);
      await client.query(build.sql);
    });
  }

  const check = plan.check;
  if (check) {
    await step(
      log,
      table,
      'add_check',
      { constraint: check.name, bound: new Date(plan.bound).toISOString() },
      () => withShortLock(client, settings, log, table, () => client.query(check.add)),
    );
  }
  let swapped: Awaited<ReturnType<typeof swapTable>>;
  try {
    if (check) {
      await step(log, table, 'validate_check', { constraint: check.name }, () =>
        client.query(check.validate),
      );
    }
    swapped = await step(log, table, 'swap', {}, () =>
      swapTable(client, settings, log, plan, async () => {
        // Only without a CHECK: a row inserted since planning expires after the bound, so
        // ATTACH refused it. A fresh plan has a bound beyond it, or moves it to the default
        // partition.
        const fresh = await planTable(pool, plan.facts.shape, settings);
        if (typeof fresh === 'string') throw new SchemaError([fresh]);
        plan = fresh;
        return plan;
      }),
    );
  } catch (error) {
    if (check) await removeCheck(client, settings, log, table, check);
    throw error;
  }

  const shape = (await describeTarget(pool, plan.facts.shape.rule, config))!;
  if (!shape.partitionedByExpiry) {
    throw new Error(`${table} was converted but does not read as partitioned by its expiry`);
  }
  log.info(
    'partition.converted',
    `${table} is partitioned by day of ${expiryColumnName(shape)!}; the ACCESS EXCLUSIVE lock was held ${swapped.lockMs} ms`,
    {
      table,
      legacyPartition: qualifiedName(plan.legacy),
      bound: new Date(plan.bound).toISOString(),
      lockMs: swapped.lockMs,
      commitMs: swapped.commitMs,
      attempts: swapped.attempts,
      partitionsCreated: plan.partitionsCreated,
      durationMs: Math.round(performance.now() - started),
    },
  );
}

/** Runs `work`, logging it as a `partition.step` with its duration. */
async function step<T>(
  log: Logger,
  table: string,
  name: string,
  fields: Record<string, unknown>,
  work: () => Promise<T>,
): Promise<T> {
  const started = performance.now();
  const result = await work();
  log.info('partition.step', `${table}: ${name.replace('_', ' ')} done`, {
    table,
    step: name,
    ...fields,
    durationMs: Math.round(performance.now() - started),
  });
  return result;
}

/**
 * The swap, in one transaction. The lock is taken first and alone, so that the time it is held
 * can be measured from the moment it is granted; the swap's statements follow in one round
 * trip, then the COMMIT. lockMs ends when the COMMIT is sent, and commitMs is the COMMIT's own
 * round trip: PostgreSQL releases the locks as soon as the commit record is flushed, and only
 * then removes the files of what the transaction dropped (the old primary key's index, tens
 * of MB on a big table), which took hundreds of milliseconds in tests while no writer waited.
 */
async function swapTable(
  client: pg.Client,
  settings: PartitionConfig,
  log: Logger,
  initialPlan: ConversionPlan,
  replan: () => Promise<ConversionPlan>,
): Promise<{ lockMs: number; commitMs: number; attempts: number }> {
  let plan = initialPlan;
  let attempts = 0;
  const result = await retryOnShortLock(settings, log, plan.table, async () => {
    attempts += 1;
    try {
      await client.query(`${swapPreamble(settings).join('\n')}\n${plan.lock}`);
      const locked = performance.now();
      await client.query(plan.swap.join('\n'));
      const swapped = performance.now();
      await client.query('COMMIT');
      return {
        lockMs: Math.round(swapped - locked),
        commitMs: Math.round(performance.now() - swapped),
        attempts,
      };
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      if (plan.check === null && serializeError(error).code === CHECK_VIOLATION) {
        plan = await replan();
        return null;
      }
      throw error;
    }
  });
  if (result === null) {
    throw new Error(
      `${plan.table}: rows kept arriving beyond the bound while converting; run partition convert again`,
    );
  }
  return result;
}

/** Runs one DDL in a transaction of its own under the short lock_timeout, retried. */
async function withShortLock(
  client: pg.Client,
  settings: PartitionConfig,
  log: Logger,
  table: string,
  statement: () => Promise<unknown>,
) {
  await retryOnShortLock(settings, log, table, async () => {
    try {
      await client.query(`BEGIN;\n${shortLockSettings(settings)}`);
      await statement();
      await client.query('COMMIT');
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    }
  });
}

/**
 * Runs `attempt` until it returns something other than null, up to the configured number of
 * attempts, each lock wait under the short lock_timeout and retried after a backoff
 * (retry.ts): a waiting ACCESS EXCLUSIVE request queues every auth query behind it, so
 * it must never wait for long. Null when the attempts ran out on nulls.
 */
async function retryOnShortLock<T>(
  settings: PartitionConfig,
  log: Logger,
  table: string,
  attempt: () => Promise<T | null>,
): Promise<T | null> {
  for (let number = 1; number <= settings.lockAttempts; number += 1) {
    const outcome = await retryOnLockTimeout(
      {
        lockTimeoutMs: settings.lockTimeoutMs,
        attempts: settings.lockAttempts - number + 1,
        maxPauseMs: 5_000,
      },
      attempt,
      ({ attempt: lockAttempt, pauseMs }) => {
        if (pauseMs === null) return;
        log.warn(
          'partition.lock_timeout',
          `the lock did not come within ${settings.lockTimeoutMs} ms; trying again`,
          { table, attempt: lockAttempt, lockTimeoutMs: settings.lockTimeoutMs },
        );
      },
    );
    if ('gaveUp' in outcome) {
      throw new Error(
        `could not lock ${table} within ${settings.lockTimeoutMs} ms in ${settings.lockAttempts} attempts: a long transaction holds it. Run partition convert again later; what is done so far stays done.`,
        { cause: outcome.gaveUp.error },
      );
    }
    if (outcome.value !== null) return outcome.value;
  }
  return null;
}

/**
 * After a failed swap the CHECK would stay on the table with its bound, and once tokens expire
 * that late, it would fail their inserts. So it goes, unless the failure makes that impossible
 * too; then the operator is told what to run.
 */
async function removeCheck(
  client: pg.Client,
  settings: PartitionConfig,
  log: Logger,
  table: string,
  check: NonNullable<ConversionPlan['check']>,
) {
  try {
    await step(log, table, 'remove_check', { constraint: check.name }, () =>
      withShortLock(client, settings, log, table, () => client.query(check.drop)),
    );
  } catch (error) {
    log.error(
      'partition.check_left',
      `the conversion failed and its CHECK ${check.name} could not be removed; run partition convert again, or ${check.drop} Until then, tokens that expire after its bound fail to insert.`,
      { table, constraint: check.name, error },
    );
  }
}
