// The one definition of "dead". Every delete re-checks it inside its own statement, on the
// database clock, so a row that came back to life between being found and being deleted (an
// un-revoke, a clock skew between hosts) is never removed.
import { sql, type FragmentSqlToken } from 'slonik';
import { qualifiedName, type TableShape } from './schema.js';

/**
 * True for a row that is marked revoked (refresh tokens) or used (password resets), and whose
 * grace, if any, has passed. The grace keeps a revoked token for the auth service to
 * recognise a replayed rotated token (RFC 9700 §4.14.2). A timestamp column carries its own
 * time; a boolean carries none, so its time comes from token_reaper.revocations, and a row
 * with no recorded time is kept until one is recorded.
 */
export function markedPredicate(shape: TableShape): FragmentSqlToken {
  const column = sql.identifier([shape.markColumn]);
  const grace = shape.target.revokedGraceSeconds;
  if (grace === 0) return markedColumnIsSet(shape);
  if (shape.markShape === 'timestamp') {
    return sql.fragment`${column} <= now() - make_interval(secs => ${grace})`;
  }
  return sql.fragment`${column} AND EXISTS (
    SELECT 1 FROM token_reaper.revocations
    WHERE reaper_relation = ${qualifiedName(shape.relation)}
      AND reaper_token_id = ${sql.identifier([shape.idColumn])}::text
      AND reaper_revoked_at <= now() - make_interval(secs => ${grace}))`;
}

/** The mark alone, without any grace: revoked (or used), whenever that was. */
export function markedColumnIsSet(shape: TableShape): FragmentSqlToken {
  // A NULL boolean is not true, and a NULL timestamp compares to nothing: neither deletes.
  // A timestamp in the future has not happened yet, so the row is not marked yet.
  const column = sql.identifier([shape.markColumn]);
  return shape.markShape === 'boolean' ? sql.fragment`${column}` : sql.fragment`${column} <= now()`;
}

/** Whether revocation times must be recorded in token_reaper.revocations for this table. */
export function recordsRevocations(shape: TableShape): boolean {
  return shape.markShape === 'boolean' && shape.target.revokedGraceSeconds > 0;
}

/** True for a row whose expiry has passed. A NULL expiry never expires. */
export function expiredPredicate(shape: TableShape): FragmentSqlToken {
  return sql.fragment`${sql.identifier([shape.expiresAtColumn])} < now()`;
}

/** True for a row that may be deleted: marked or expired. */
export function deadPredicate(shape: TableShape): FragmentSqlToken {
  return sql.fragment`(${markedPredicate(shape)} OR ${expiredPredicate(shape)})`;
}
