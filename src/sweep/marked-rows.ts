// Deletes the rows of one relation that are marked revoked (or used), in batches:
//
//   DELETE FROM leaf WHERE ctid = ANY(ARRAY(SELECT ctid FROM leaf WHERE revoked LIMIT n))
//                      AND revoked
//
// The inner SELECT reads the partial index on revoked rows, so the cost follows the number of
// revoked rows, not the size of the table: that is what makes a catch-up on every reconnect
// cheap, and what lets a partitioned sweep skip scanning live partitions. It works on one
// relation at a time because a ctid is only unique within one: on a partitioned parent the
// same ctid names a row in every partition. The predicate is checked again by the DELETE, so
// a row restored since the SELECT stays. A TID scan visits its list in sorted order, so this
// locks rows in physical order, like the sweep's TID-range batches: the two cannot deadlock.
// Rows another transaction has locked are skipped (FOR UPDATE SKIP LOCKED), not waited on: a
// foreign-key check in the auth service holds FOR KEY SHARE on a token for the length of its
// transaction, and one such row must not stall every other deletion. What is left, locked or
// revoked since, is counted at the end (`remaining`), so the caller can come back for it.
// The re-check is wrapped in coalesce(…, false), which means the same, so that the planner
// cannot match it to the partial index: right after a burst, statistics still say almost
// nothing is revoked, and it would scan the whole partial index for every batch instead of
// visiting the listed TIDs (measured: 100,000 revoked rows in 36 s instead of 1.6 s).
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import { retryOnDeadlock } from '../db.js';
import { deletion, markerIndexPredicate, purgeablePredicate } from '../predicates.js';
import { relationIdentifier, type Relation, type TableShape } from '../schema.js';

export const MARKED_ROWS_BATCH = 5_000;

export interface MarkedRowsResult {
  /** Rows deleted, or in count mode the rows that would be. */
  rows: number;
  batches: number;
  /** Delete mode: the marked rows still there at the end, mostly ones another transaction locked. */
  remaining: number;
}

const countRow = z.object({ count: z.number() });

export async function deleteMarkedRows(
  pool: DatabasePool,
  shape: TableShape,
  relation: Relation,
  options: {
    mode?: 'delete' | 'count';
    signal?: AbortSignal;
    /** Called after each committed batch, so a caller can report progress even on failure. */
    onBatch?: (rows: number) => void;
  } = {},
): Promise<MarkedRowsResult> {
  const table = relationIdentifier(relation);
  const marked = purgeablePredicate(shape, relation);
  const indexed = markerIndexPredicate(shape, relation) ?? sql.fragment`false`;
  if (options.mode === 'count') {
    const rows = await pool.oneFirst(
      sql.type(countRow)`SELECT count(*)::int AS count FROM ${table} WHERE ${marked}`,
    );
    return { rows, batches: 0, remaining: 0 };
  }
  let rows = 0;
  let batches = 0;
  for (;;) {
    const batchRows = await retryOnDeadlock(() =>
      pool.oneFirst(sql.type(countRow)`
      ${deletion(shape, relation, {
        where: sql.fragment`ctid = ANY(ARRAY(
            SELECT ctid FROM ${table} WHERE ${indexed} AND ${marked}
            LIMIT ${MARKED_ROWS_BATCH} FOR UPDATE SKIP LOCKED))
          AND coalesce(${marked}, false)`,
        returning: sql.fragment`1 AS one`,
      })}
      SELECT count(*)::int AS count FROM token_reaper_deleted
    `),
    );
    options.onBatch?.(batchRows);
    rows += batchRows;
    batches += 1;
    if (batchRows < MARKED_ROWS_BATCH || options.signal?.aborted) break;
  }
  const remaining = await pool.oneFirst(
    sql.type(countRow)`SELECT count(*)::int AS count FROM ${table} WHERE ${indexed} AND ${marked}`,
  );
  return { rows, batches, remaining };
}
