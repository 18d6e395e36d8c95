// The one definition of "dead". Every delete re-checks it inside its own statement, on the
// database clock, so a row that came back to life between being found and being deleted (an
// un-revoke, a clock skew between hosts) is never removed.
import { sql, type FragmentSqlToken } from 'slonik';
import type { TableShape } from './schema.js';

/** True for a row that is marked revoked (refresh tokens) or used (password resets). */
export function markedPredicate(shape: TableShape): FragmentSqlToken {
  const column = sql.identifier([shape.markColumn]);
  // A NULL boolean is not true, and a NULL timestamp compares to nothing: neither deletes.
  // A timestamp in the future has not happened yet, so the row is not marked yet.
  return shape.markShape === 'boolean' ? sql.fragment`${column}` : sql.fragment`${column} <= now()`;
}

/** True for a row whose expiry has passed. A NULL expiry never expires. */
export function expiredPredicate(shape: TableShape): FragmentSqlToken {
  return sql.fragment`${sql.identifier([shape.expiresAtColumn])} < now()`;
}

/** True for a row that may be deleted: marked or expired. */
export function deadPredicate(shape: TableShape): FragmentSqlToken {
  return sql.fragment`(${markedPredicate(shape)} OR ${expiredPredicate(shape)})`;
}
