// Deleting around rows another transaction holds locked. An auth service's foreign-key check
// holds FOR KEY SHARE on a token for its whole transaction, and a DELETE that meets such a row
// waits for it: one lock then stalls a sweep batch, a purge and every revocation queued
// behind it, and a catch-up. `FOR UPDATE SKIP LOCKED` would skip it, but taking a row lock
// needs the UPDATE privilege, which the role `install --role` makes must not have (it could
// un-revoke a token), and it writes every row twice to the heap and the WAL (measured in
// sweep/tid-range.ts: 0.85× the throughput, +20% WAL).
//
// So every delete runs in a transaction of its own that waits at most a moment for a row lock
// (`withinRowLockWait`). Only when that runs out are the rows it covered, listed without any
// lock, deleted in parts (`deleteAroundLockedRows`); a part that meets a lock again is split,
// until the parts that still fail are the locked rows themselves, which are left and counted
// as `skipped`, for the caller to retry later. The table lock is taken before the wait is
// limited, so only row locks count: a DDL holding the table is waited for like any statement,
// up to the statement timeout.
import {
  sql,
  type DatabasePoolConnection,
  type DatabaseTransactionConnection,
  type FragmentSqlToken,
} from 'slonik';
import { z } from 'zod';
import { serializeError } from './logger.js';
import { deletion } from './predicates.js';
import { relationIdentifier, type Relation } from './relation.js';
import type { TableShape } from './schema.js';

/**
 * How long a delete waits for a row lock before it deletes around the locked rows: well above
 * an auth transaction's own length (its p99 was 2–9 ms in the benchmark), so a lock taken for
 * one request is waited out; and short, because the delete holds the locks of the rows it has
 * already deleted for as long as it waits.
 */
export const ROW_LOCK_WAIT_MS = 100;
/**
 * The wait of each step that narrows down a lock already held for longer than that: short,
 * since every step that meets the lock again costs this much.
 */
const NARROWING_LOCK_WAIT_MS = 20;
/** How many parts the rows that met a lock are split into, at every step. */
const NARROWING_PARTS = 16;
/**
 * How long one delete may spend deleting around locked rows. In a 500-page sweep batch of
 * 17,720 dead rows (PostgreSQL 15, 2 cores, medians of 5) that took 0.5 s for one locked row
 * and 1.5 s for ten, against 31 ms with none. Past the budget, the parts still unresolved are
 * left whole, counted as skipped and retried with the rest, so a transaction that locks many
 * rows costs each delete about 2 s at most.
 */
const NARROWING_BUDGET_MS = 2_000;
const LOCK_NOT_AVAILABLE = '55P03';

/**
 * Runs `statement` in a transaction of its own that waits at most `lockWaitMs` for a row lock
 * of `relation` (a table, a partition, or a partitioned table and so all its partitions).
 * Returns what the statement returned, or null when a lock did not come in time, in which
 * case nothing was changed.
 */
export async function withinRowLockWait<T>(
  connection: DatabasePoolConnection,
  relation: Relation,
  statement: (transaction: DatabaseTransactionConnection) => Promise<T>,
  lockWaitMs = ROW_LOCK_WAIT_MS,
): Promise<T | null> {
  try {
    return await connection.transaction(async (transaction) => {
      await transaction.query(
        sql.unsafe`LOCK TABLE ${relationIdentifier(relation)} IN ROW EXCLUSIVE MODE`,
      );
      await transaction.query(
        sql.unsafe`SELECT set_config('lock_timeout', ${`${lockWaitMs}ms`}, true)`,
      );
      return statement(transaction);
    });
  } catch (error) {
    if (serializeError(error).code === LOCK_NOT_AVAILABLE) return null;
    throw error;
  }
}

const countRow = z.object({ count: z.number() });

/** The rows of `relation` that match `where`, deleted by the one DELETE builder, counted. */
export function countDeleted(
  connection: DatabaseTransactionConnection | DatabasePoolConnection,
  shape: TableShape,
  relation: Relation,
  where: FragmentSqlToken,
): Promise<number> {
  return connection.oneFirst(sql.type(countRow)`
    ${deletion(shape, relation, { where, returning: sql.fragment`1 AS one` })}
    SELECT count(*)::int AS count FROM token_reaper_deleted
  `);
}

export interface AroundLockedRows {
  shape: TableShape;
  relation: Relation;
  /**
   * What tells the rows apart: ctids (within one relation), or ids. Listed without a lock by
   * the caller; rows that are no longer to be deleted are kept by `where` anyway.
   */
  keys: readonly string[];
  /** The rows of `part` still to be deleted: the keys and the re-checked rule. */
  where: (part: readonly string[]) => FragmentSqlToken;
}

export interface AroundLockedRowsResult {
  rows: number;
  skipped: number;
  /** The keys of the rows left: locked, or not told apart from locked ones in time. */
  skippedKeys: string[];
}

/**
 * Deletes the listed rows in parts, each within a short lock wait, splitting a part that
 * meets a lock, so that only the locked rows are left; all on one connection (slonik destroys
 * a connection whose handler throws, and opening another after every lock timeout would cost
 * more than the timeout). Parts are taken in the order of `keys`, so that ctids listed in
 * physical order are locked in physical order, as every batch locks them.
 */
export async function deleteAroundLockedRows(
  connection: DatabasePoolConnection,
  { shape, relation, keys, where }: AroundLockedRows,
): Promise<AroundLockedRowsResult> {
  const deadline = performance.now() + NARROWING_BUDGET_MS;
  let rows = 0;
  const skippedKeys: string[] = [];
  const parts = [keys];
  for (let part = parts.pop(); part !== undefined; part = parts.pop()) {
    if (performance.now() >= deadline) {
      skippedKeys.push(...part);
      continue;
    }
    const partRows = await withinRowLockWait(
      connection,
      relation,
      (transaction) => countDeleted(transaction, shape, relation, where(part)),
      NARROWING_LOCK_WAIT_MS,
    );
    if (partRows !== null) {
      rows += partRows;
    } else if (part.length === 1) {
      skippedKeys.push(...part);
    } else {
      // The last part is pushed first, so that the parts are taken in order.
      const size = Math.ceil(part.length / NARROWING_PARTS);
      for (let end = part.length; end > 0; end -= size) {
        parts.push(part.slice(Math.max(0, end - size), end));
      }
    }
  }
  return { rows, skipped: skippedKeys.length, skippedKeys };
}
