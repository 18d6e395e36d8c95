// The one place that turns a column into an instant. Every path that compares a row's time
// with the database clock (the sweep, the dry run, the purge's re-check, the catch-up, the
// grace, partition bounds, premaking, explain) goes through here, so no path can read a
// column differently from another.
//
// - timestamptz, at any precision, already is an instant.
// - timestamp without time zone is a wall-clock reading. It is read in the zone the operator
//   declared (NAIVE_TIMESTAMPS_TIMEZONE, or the target's `timezone`), never in the session's:
//   `expires_at < now()` on such a column reads it in whatever TimeZone the connection has,
//   and on a server set to Asia/Tokyo that deleted 1,000 of 1,000 live tokens.
// - integers hold epoch seconds or milliseconds, as the rule declares. An integer has no
//   infinity, so an application that means "never" writes an extreme value instead (the
//   type's maximum, say). Outside the range a timestamptz can hold, to_timestamp() raises an
//   error, which would fail every statement that reads the row; such a value reads as
//   infinity (or -infinity) instead, which is what it means. A numeric NaN compares above
//   every number, so it reads as infinity: like NULL, an expiry that never comes.
import { sql, type FragmentSqlToken } from 'slonik';
import { columnOf, type Relation } from '../relation.js';

export type TimeReading =
  | { readonly kind: 'instant' }
  | { readonly kind: 'naive'; readonly zone: string }
  | { readonly kind: 'epoch'; readonly unit: 'seconds' | 'milliseconds' };

export interface TimeColumn {
  readonly column: string;
  /** As format_type prints it: `timestamp(3) without time zone`, `bigint`. */
  readonly type: string;
  readonly reading: TimeReading;
}

/** The base types (pg_type names through regtype) that hold a time, and how each is read. */
export const TIMESTAMP_WITH_TIME_ZONE = 'timestamp with time zone';
export const TIMESTAMP_WITHOUT_TIME_ZONE = 'timestamp without time zone';
export const EPOCH_TYPES: readonly string[] = ['smallint', 'integer', 'bigint', 'numeric'];

/**
 * The epoch seconds to_timestamp() accepts: from the first instant a timestamptz holds
 * (4714-11-24 BC, Julian day 0) up to, not including, 294277-01-01 (PostgreSQL's
 * float8_timestamptz checks the same two bounds).
 */
const FIRST_EPOCH_SECOND = -210_866_803_200;
const END_EPOCH_SECOND = 9_224_318_016_000;

/** The column of `relation` (the FROM item of the statement) as a timestamptz. */
export function instantOf(time: TimeColumn, relation: Relation): FragmentSqlToken {
  const column = columnOf(relation, time.column);
  return instantOfValue(column, time.reading);
}

/**
 * Any value of the column's type as a timestamptz: the column itself, or a partition bound
 * read back from its text.
 */
export function instantOfValue(
  value: FragmentSqlToken | ReturnType<typeof sql.identifier>,
  reading: TimeReading,
): FragmentSqlToken {
  switch (reading.kind) {
    case 'instant':
      return sql.fragment`${value}`;
    case 'naive':
      return sql.fragment`(${value} AT TIME ZONE ${reading.zone}::text)`;
    case 'epoch': {
      const seconds =
        reading.unit === 'seconds'
          ? sql.fragment`${value}::float8`
          : sql.fragment`(${value} / 1000.0)::float8`;
      return sql.fragment`to_timestamp(CASE WHEN ${seconds} >= ${END_EPOCH_SECOND} THEN 'infinity'
                                            WHEN ${seconds} < ${FIRST_EPOCH_SECOND} THEN '-infinity'
                                            ELSE ${seconds} END)`;
    }
  }
}

/** A partition bound's text (as pg_get_expr prints it) as a timestamptz. */
export function instantOfBoundText(text: FragmentSqlToken, reading: TimeReading): FragmentSqlToken {
  return reading.kind === 'naive'
    ? instantOfValue(sql.fragment`${text}::timestamp`, reading)
    : sql.fragment`${text}::timestamptz`;
}

/** How a column's time is read, in words, for explain and the startup log. */
export function describeReading(time: TimeColumn): string {
  switch (time.reading.kind) {
    case 'instant':
      return `${time.type}: an instant`;
    case 'naive':
      return `${time.type}: wall-clock time in ${time.reading.zone}`;
    case 'epoch':
      return `${time.type}: epoch ${time.reading.unit}`;
  }
}
