// The one definition of "dead": a resolved rule turned into SQL. Every delete re-checks it
// inside its own statement, on the database clock, so a row that came back to life between
// being found and being deleted (an un-revoke, a clock skew between hosts) is never removed.
// NULL never makes a row dead: a NULL marker is not set, a NULL expiry never comes.
//
// Each predicate is written for one relation, the FROM item of its statement (the table, or
// one of its partitions), and qualifies every column with it, so it means the same inside
// any subquery.
import { sql, type FragmentSqlToken } from 'slonik';
import { columnOf, qualifiedName, relationIdentifier, type Relation } from './relation.js';
import type { TableShape } from './schema.js';
import { instantOf } from './targets/time.js';

type Shape = Pick<
  TableShape,
  'relation' | 'id' | 'marker' | 'expiry' | 'keepExpiredForSeconds' | 'references'
>;

/** `now() - seconds`, or `now()` itself for 0. */
function ago(seconds: number) {
  return seconds > 0
    ? sql.fragment`now() - make_interval(secs => ${seconds})`
    : sql.fragment`now()`;
}

/**
 * The marker alone, without its grace: revoked (or used, or inactive), whenever that was.
 * Null for a rule without a marker.
 */
export function markerSetPredicate(shape: Shape, relation: Relation): FragmentSqlToken | null {
  const marker = shape.marker;
  if (marker === null) return null;
  if (marker.kind === 'time') return sql.fragment`${instantOf(marker.time, relation)} <= now()`;
  const column = columnOf(relation, marker.column);
  return marker.dead ? sql.fragment`${column}` : sql.fragment`NOT ${column}`;
}

/**
 * The partial index's predicate for marked rows, in the form install writes it: the catch-up
 * repeats it, so that the planner matches the index without having to prove anything.
 */
export function markerIndexPredicate(shape: Shape, relation: Relation): FragmentSqlToken | null {
  const marker = shape.marker;
  if (marker === null) return null;
  if (marker.kind === 'time')
    return sql.fragment`${columnOf(relation, marker.time.column)} IS NOT NULL`;
  return markerSetPredicate(shape, relation);
}

/**
 * Marked and past the marker's grace. The grace keeps a revoked token for the auth service to
 * recognise a replayed rotated token (RFC 9700 §4.14.2). A timestamp marker carries its own
 * time; a boolean counts from its `graceFrom` column, or else from the time token_reaper.revocations
 * recorded when the row was first seen revoked (a row with no record yet is kept).
 */
export function markedPredicate(shape: Shape, relation: Relation): FragmentSqlToken | null {
  const marker = shape.marker;
  if (marker === null) return null;
  if (marker.kind === 'time') {
    return sql.fragment`${instantOf(marker.time, relation)} <= ${ago(marker.graceSeconds)}`;
  }
  const set = markerSetPredicate(shape, relation)!;
  if (marker.graceSeconds === 0) return set;
  if (marker.graceFrom !== null) {
    return sql.fragment`(${set} AND ${instantOf(marker.graceFrom, relation)} <= ${ago(marker.graceSeconds)})`;
  }
  return sql.fragment`(${set} AND EXISTS (
    SELECT 1 FROM token_reaper.revocations
    WHERE reaper_relation = ${qualifiedName(shape.relation)}
      AND reaper_token_id = ${columnOf(relation, shape.id!.column)}::text
      AND reaper_revoked_at <= ${ago(marker.graceSeconds)}))`;
}

/** The instant the row expires (before keepExpiredFor), or null for a rule without expiry. */
export function expiryInstant(shape: Shape, relation: Relation): FragmentSqlToken | null {
  const expiry = shape.expiry;
  if (expiry === null) return null;
  switch (expiry.kind) {
    case 'column':
      return instantOf(expiry.time, relation);
    case 'lifetime':
      return sql.fragment`(${instantOf(expiry.from, relation)} + make_interval(secs => ${expiry.lifetimeSeconds}))`;
    case 'lifetimeColumn':
      return sql.fragment`(${instantOf(expiry.from, relation)} + make_interval(secs => ${columnOf(relation, expiry.secondsColumn)}))`;
  }
}

/** Expired, and kept past its expiry for keepExpiredFor. Null for a rule without expiry. */
export function expiredPredicate(shape: Shape, relation: Relation): FragmentSqlToken | null {
  const instant = expiryInstant(shape, relation);
  if (instant === null) return null;
  const expired = sql.fragment`${instant} < ${ago(shape.keepExpiredForSeconds)}`;
  const unlessSet = shape.expiry!.unlessSet;
  return unlessSet === null
    ? expired
    : sql.fragment`(${expired} AND ${columnOf(relation, unlessSet)} IS NULL)`;
}

/**
 * Rows another table still references through a key without ON DELETE, when the rule keeps
 * them: they stay until the reference goes. Null when there is nothing to keep.
 */
function unreferencedPredicate(shape: Shape, relation: Relation): FragmentSqlToken | null {
  const kept = shape.references.filter((reference) => reference.handling === 'keep');
  if (kept.length === 0) return null;
  return sql.fragment`${sql.join(
    kept.map((reference) => {
      const matches = reference.columns.map(
        (column, index) =>
          sql.fragment`${columnOf(reference.from, column)} = ${columnOf(relation, reference.referenced[index]!)}`,
      );
      return sql.fragment`NOT EXISTS (SELECT 1 FROM ${relationIdentifier(reference.from)} WHERE ${sql.join(matches, sql.fragment` AND `)})`;
    }),
    sql.fragment` AND `,
  )}`;
}

function allOf(parts: readonly (FragmentSqlToken | null)[]): FragmentSqlToken {
  const present = parts.filter((part): part is FragmentSqlToken => part !== null);
  return present.length === 0
    ? sql.fragment`true`
    : sql.fragment`(${sql.join(present, sql.fragment` AND `)})`;
}

/** The rows the prompt purge and the catch-up may delete: marked, past the grace. */
export function purgeablePredicate(shape: Shape, relation: Relation): FragmentSqlToken {
  const marked = markedPredicate(shape, relation);
  return allOf([marked ?? sql.fragment`false`, unreferencedPredicate(shape, relation)]);
}

/** True for a row that may be deleted: marked past its grace, or expired past its keep. */
export function deadPredicate(shape: Shape, relation: Relation): FragmentSqlToken {
  const either = [markedPredicate(shape, relation), expiredPredicate(shape, relation)].filter(
    (part): part is FragmentSqlToken => part !== null,
  );
  return allOf([
    sql.fragment`(${sql.join(either, sql.fragment` OR `)})`,
    unreferencedPredicate(shape, relation),
  ]);
}

/**
 * A DELETE of `relation`'s rows that match `where`, as the CTE `token_reaper_deleted`, which
 * returns `returning`. References the rule unlinks are set to NULL in the same statement, so
 * a deferred foreign key finds nothing left to complain about at commit. The caller selects
 * from token_reaper_deleted.
 */
export function deletion(
  shape: Shape,
  relation: Relation,
  options: { where: FragmentSqlToken; using?: FragmentSqlToken; returning: FragmentSqlToken },
): FragmentSqlToken {
  const unlinked = shape.references.filter((reference) => reference.handling === 'unlink');
  const keys = [...new Set(unlinked.flatMap((reference) => reference.referenced))];
  const returning = sql.join(
    [
      options.returning,
      ...keys.map(
        (key, index) =>
          sql.fragment`${columnOf(relation, key)} AS ${sql.identifier([`token_reaper_key_${index}`])}`,
      ),
    ],
    sql.fragment`, `,
  );
  const using = options.using ? sql.fragment`USING ${options.using}` : sql.fragment``;
  const unlinks = unlinked.map((reference, index) => {
    const assignments = reference.columns.map(
      (column) => sql.fragment`${sql.identifier([column])} = NULL`,
    );
    const columns = reference.columns.map((column) => columnOf(reference.from, column));
    const keyColumns = reference.referenced.map((key) =>
      sql.identifier([`token_reaper_key_${keys.indexOf(key)}`]),
    );
    return sql.fragment`, ${sql.identifier([`token_reaper_unlinked_${index}`])} AS (
      UPDATE ${relationIdentifier(reference.from)} SET ${sql.join(assignments, sql.fragment`, `)}
      WHERE (${sql.join(columns, sql.fragment`, `)}) IN (SELECT ${sql.join(keyColumns, sql.fragment`, `)} FROM token_reaper_deleted))`;
  });
  return sql.fragment`WITH token_reaper_deleted AS (
    DELETE FROM ${relationIdentifier(relation)} ${using}
    WHERE ${options.where}
    RETURNING ${returning}
  )${unlinks.length > 0 ? sql.join(unlinks, sql.fragment``) : sql.fragment``}`;
}
