// Revocation times for a table whose revoked column is a boolean, kept in
// token_reaper.revocations while REFRESH_TOKEN_REVOKED_GRACE is above 0 (see predicates.ts,
// which reads them). Every time here comes from the database clock, never from a payload:
// a NOTIFY costs nothing to forge, so it may only make the daemon look at a row. A row gets
// the time it is first seen revoked, and only while it is revoked; a row seen un-revoked
// loses its record (the trigger notifies both ways), so a revocation after an un-revoke
// starts a fresh grace. Records of rows that are gone are forgotten by catch-ups and sweeps.
import { sql, type DatabasePool } from 'slonik';
import { retryOnDeadlock } from './db.js';
import { markerSetPredicate } from './predicates.js';
import {
  columnOf,
  idTypeOf,
  qualifiedName,
  relationIdentifier,
  type Relation,
  type TableShape,
} from './schema.js';

/**
 * Looks at the rows the NOTIFYs named, as they are now: a revoked row without a record gets
 * now(), and the record of a row that is not revoked (any more) is forgotten. Returns the
 * number of rows recorded.
 */
export async function recordRevocations(
  pool: DatabasePool,
  shape: TableShape,
  ids: readonly string[],
): Promise<number> {
  const table = relationIdentifier(shape.relation);
  const id = columnOf(shape.relation, shape.id!.column);
  const revoked = markerSetPredicate(shape, shape.relation)!;
  const named = sql.fragment`${sql.array(ids, 'text')}::${idTypeOf(shape)}[]`;
  return retryOnDeadlock(() =>
    pool.oneFirst(sql.unsafe`
      WITH forgotten AS (
        DELETE FROM token_reaper.revocations
        WHERE reaper_relation = ${qualifiedName(shape.relation)}
          AND reaper_token_id = ANY(${named}::text[])
          AND NOT EXISTS (
            SELECT 1 FROM ${table}
            WHERE ${id} = reaper_token_id::${idTypeOf(shape)} AND ${revoked})
      ), recorded AS (
        INSERT INTO token_reaper.revocations (reaper_relation, reaper_token_id, reaper_revoked_at)
        SELECT ${qualifiedName(shape.relation)}, ${id}::text, now()
        FROM ${table}
        WHERE ${id} = ANY(${named}) AND ${revoked}
        ON CONFLICT DO NOTHING
        RETURNING 1
      )
      SELECT count(*)::int FROM recorded
    `),
  );
}

/** Gives every revoked row of `leaf` that has no recorded time the time it is first seen. */
export async function recordUnseenRevocations(
  pool: DatabasePool,
  shape: TableShape,
  leaf: Relation,
): Promise<number> {
  const result = await pool.query(sql.unsafe`
    INSERT INTO token_reaper.revocations (reaper_relation, reaper_token_id, reaper_revoked_at)
    SELECT ${qualifiedName(shape.relation)}, ${columnOf(leaf, shape.id!.column)}::text, now()
    FROM ${relationIdentifier(leaf)}
    WHERE ${markerSetPredicate(shape, leaf)!}
    ON CONFLICT DO NOTHING
  `);
  return result.rowCount;
}

/** Forgets the records of rows that were deleted or are no longer revoked. */
export async function forgetRevocations(pool: DatabasePool, shape: TableShape): Promise<number> {
  const table = relationIdentifier(shape.relation);
  const result = await pool.query(sql.unsafe`
    DELETE FROM token_reaper.revocations
    WHERE reaper_relation = ${qualifiedName(shape.relation)}
      AND NOT EXISTS (
        SELECT 1 FROM ${table}
        WHERE ${columnOf(shape.relation, shape.id!.column)} = reaper_token_id::${idTypeOf(shape)}
          AND ${markerSetPredicate(shape, shape.relation)!})
  `);
  return result.rowCount;
}
