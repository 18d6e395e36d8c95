// Revocation times for a table whose revoked column is a boolean, kept in
// token_reaper.revocations while REFRESH_TOKEN_REVOKED_GRACE is above 0 (see predicates.ts,
// which reads them). A time comes from the trigger's NOTIFY when there was one; a revoked row
// found without a time (its NOTIFY was lost, or it was revoked before install) gets the time
// it was first seen, so its grace starts then. Records of rows that are gone, or no longer
// revoked, are forgotten by the sweep.
import { sql, type DatabasePool } from 'slonik';
import { retryOnDeadlock } from './db.js';
import type { Revocation } from './purge.js';
import { markerSetPredicate } from './predicates.js';
import {
  columnOf,
  idTypeOf,
  qualifiedName,
  relationIdentifier,
  type Relation,
  type TableShape,
} from './schema.js';

/** Records the times the NOTIFYs carried; a time already recorded is kept. */
export async function recordRevocations(
  pool: DatabasePool,
  shape: TableShape,
  revocations: readonly Revocation[],
): Promise<number> {
  const result = await retryOnDeadlock(() =>
    pool.query(sql.unsafe`
      INSERT INTO token_reaper.revocations (reaper_relation, reaper_token_id, reaper_revoked_at)
      SELECT ${qualifiedName(shape.relation)}, id, revoked_at
      FROM unnest(${sql.array(
        revocations.map((revocation) => revocation.id),
        'text',
      )}, ${sql.array(
        revocations.map((revocation) => revocation.revokedAt),
        'text',
      )}::timestamptz[]) AS batch (id, revoked_at)
      ON CONFLICT DO NOTHING
    `),
  );
  return result.rowCount;
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
