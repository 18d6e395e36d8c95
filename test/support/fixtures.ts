// The auth service's tables as DESIGN.md gives them, and rows to fill them with.
//
// Rows come in four kinds: live, expired, revoked (used) and both. Their expiries stay at least
// an hour away from now(), so no row changes kind while a test runs, and whether a row is dead is
// always decided on the database clock, like token-reaper decides it. The kinds are shuffled
// before the insert, so dead rows sit on every page of the heap as they do in production, where
// a batch-by-page sweep has to find them.

import { readFile } from 'node:fs/promises';
import pg from 'pg';

import { waitFor } from './cli.js';
import type { TestDatabase, TestDatabaseHandle } from './database.js';

/** A pool, a client, or a TestDatabase (its pool is used). */
export type DatabaseTarget = pg.Pool | pg.ClientBase | Pick<TestDatabase, 'pool'>;

/** `name`, `schema.name` (split at the first dot), or the parts, unquoted. */
export type TableName = string | { readonly schema?: string; readonly name: string };

/** How a table records that a row was revoked or used. */
export type FlagShape = 'boolean' | 'timestamp';

/** Which of the two reference tables a table plays: it decides between revoked and used. */
export type TableKind = 'refresh_tokens' | 'password_resets';

export interface ReferenceSchemaOptions {
  /** Created if missing. Default `public`. */
  readonly schema?: string;
  /** Default `refresh_tokens`. */
  readonly refreshTokensTable?: string;
  /** Default `password_resets`; null creates no password-resets table. */
  readonly passwordResetsTable?: string | null;
  /** `boolean`: `revoked boolean not null default false`; `timestamp`: `revoked_at timestamptz null`. */
  readonly revokedShape?: FlagShape;
  /** `boolean`: `used boolean not null default false`; `timestamp`: `used_at timestamptz null`. */
  readonly usedShape?: FlagShape;
}

export interface ReferenceSchema {
  /** Quoted and schema-qualified, ready for SQL. */
  readonly refreshTokensTable: string;
  readonly passwordResetsTable: string | null;
}

/**
 * Creates the reference tables. `id` gets `default gen_random_uuid()` so that tests can insert
 * rows without inventing ids, as the auth service's ORM would.
 */
export async function createReferenceSchema(
  database: DatabaseTarget,
  options: ReferenceSchemaOptions = {},
): Promise<ReferenceSchema> {
  const schema = options.schema ?? 'public';
  const refreshTokensTable = quoteTable({
    schema,
    name: options.refreshTokensTable ?? 'refresh_tokens',
  });
  const passwordResetsName =
    options.passwordResetsTable === undefined ? 'password_resets' : options.passwordResetsTable;
  const passwordResetsTable =
    passwordResetsName === null ? null : quoteTable({ schema, name: passwordResetsName });

  const revokedColumn =
    (options.revokedShape ?? 'boolean') === 'boolean'
      ? 'revoked boolean not null default false'
      : 'revoked_at timestamptz null';
  const usedColumn =
    (options.usedShape ?? 'boolean') === 'boolean'
      ? 'used boolean not null default false'
      : 'used_at timestamptz null';

  const statements = [
    `create schema if not exists ${pg.escapeIdentifier(schema)}`,
    `create table ${refreshTokensTable} (
       id uuid primary key default gen_random_uuid(),
       user_id uuid not null,
       token_hash text not null unique,
       ${revokedColumn},
       expires_at timestamptz not null,
       created_at timestamptz not null default now())`,
  ];
  if (passwordResetsTable !== null) {
    statements.push(`create table ${passwordResetsTable} (
       id uuid primary key default gen_random_uuid(),
       user_id uuid not null,
       token_hash text not null,
       ${usedColumn},
       expires_at timestamptz not null,
       created_at timestamptz not null default now())`);
  }
  await withClient(database, async (client) => {
    await client.query('begin');
    try {
      for (const statement of statements) await client.query(statement);
      await client.query('commit');
    } catch (error) {
      await client.query('rollback');
      throw error;
    }
  });
  return { refreshTokensTable, passwordResetsTable };
}

/** Refresh-token kinds, and password-reset kinds (where "used" plays the part of "revoked"). */
export type RefreshTokenKind = 'live' | 'expired' | 'revoked' | 'expiredAndRevoked';
export type PasswordResetKind = 'live' | 'expired' | 'used' | 'expiredAndUsed';
export type RowKind = RefreshTokenKind | PasswordResetKind;

/**
 * A table to read or fill. Its columns decide its kind and shape; `kind` and `shape`, when given,
 * are what the caller expects, and a mismatch is an error, so a test cannot silently use the
 * wrong table.
 */
export interface TableOptions {
  readonly table: TableName;
  readonly kind?: TableKind;
  readonly shape?: FlagShape;
}

export interface InsertRandomRowsOptions extends TableOptions {
  readonly count: number;
  /**
   * The share of each kind, summing to 1. Kinds left out get none, so `{ live: 1 }` means all
   * live. Default: 0.5 live, 0.2 expired, 0.2 revoked (used), 0.1 both. Counts are exact: shares
   * are rounded by largest remainder.
   */
  readonly fractions?: Partial<Record<RowKind, number>>;
  /**
   * Makes ids, hashes, kinds and expiries (relative to now()) the same on every run. Inserting
   * twice into one table with the same seed repeats the ids, which the primary key rejects.
   */
  readonly seed?: number;
}

/** How many rows of each kind were inserted, keyed by the table's own kinds. */
export type InsertedRows = Readonly<Partial<Record<RowKind, number>>> & { readonly total: number };

interface TableShape {
  readonly quoted: string;
  /** `revoked`, `revoked_at`, `used` or `used_at`. */
  readonly flagColumn: string;
  readonly shape: FlagShape;
  readonly kinds: readonly [live: RowKind, expired: RowKind, flagged: RowKind, both: RowKind];
}

const DEFAULT_SHARES = [0.5, 0.2, 0.2, 0.1] as const;

/**
 * Inserts `count` rows in one `INSERT … SELECT` over generate_series, which takes about a second
 * per million rows. With `seed`, setseed() runs in the same transaction, so random() repeats.
 */
export async function insertRandomRows(
  database: DatabaseTarget,
  options: InsertRandomRowsOptions,
): Promise<InsertedRows> {
  if (!Number.isInteger(options.count) || options.count < 0) {
    throw new Error(`count must be a whole number of rows, not ${options.count}`);
  }
  if (options.seed !== undefined && !(options.seed >= -1 && options.seed <= 1)) {
    throw new Error(`seed must lie in [-1, 1], as setseed() requires, not ${options.seed}`);
  }
  return withClient(database, async (client) => {
    const table = await readTableShape(client, options);
    const counts = splitCount(options.count, kindShares(table, options.fractions));
    const [liveCount, expiredCount, flaggedCount] = counts;
    const flagValue =
      table.shape === 'boolean'
        ? 'kind >= 2'
        : // Revoked at some past moment after creation, and at least a minute ago.
          `case when kind >= 2
             then least(now() - interval '1 minute', created_at + random() * (now() - created_at))
           end`;

    await client.query('begin');
    try {
      if (options.seed !== undefined) await client.query('select setseed($1)', [options.seed]);
      // Kinds 0..3 are live, expired, flagged and both, assigned by position and then shuffled
      // by sorting on the random id: that spreads every kind over the whole heap, and fills the
      // primary key in order, which is faster than sorting by another random(). The sort ends
      // before the outer random() calls begin, so a seed makes the whole row reproducible.
      await client.query(
        `insert into ${table.quoted} (id, user_id, token_hash, ${pg.escapeIdentifier(table.flagColumn)}, expires_at, created_at)
         select id, user_id, token_hash, ${flagValue}, expires_at, created_at
         from (
           select id, user_id, token_hash, kind, expires_at, expires_at - interval '30 days' as created_at
           from (
             select id,
                    md5('user:' || floor(random() * 1000)::int)::uuid as user_id,
                    md5(random()::text || ':hash:' || position) as token_hash,
                    kind,
                    case when kind in (0, 2)
                      then now() + interval '1 hour' + random() * interval '29 days 23 hours'
                      else now() - interval '1 hour' - random() * interval '29 days 23 hours'
                    end as expires_at
             from (
               select position,
                      md5(random()::text || ':id:' || position)::uuid as id,
                      case when position <= $1 then 0
                           when position <= $1 + $2 then 1
                           when position <= $1 + $2 + $3 then 2
                           else 3 end as kind
               from generate_series(1, $4::int) as position
               order by id
             ) as shuffled
           ) as generated
         ) as dated`,
        [liveCount, expiredCount, flaggedCount, options.count],
      );
      await client.query('commit');
    } catch (error) {
      await client.query('rollback');
      throw error;
    }

    const inserted: Partial<Record<RowKind, number>> = {};
    table.kinds.forEach((kind, index) => {
      inserted[kind] = counts[index] ?? 0;
    });
    return { ...inserted, total: options.count };
  });
}

/** Ids of the rows that are live now on the database clock, in id order. */
export async function liveIds(
  database: DatabaseTarget,
  options: TableOptions,
): Promise<Set<string>> {
  return withClient(database, async (client) => {
    const table = await readTableShape(client, options);
    const result = await client.query<{ id: string }>(
      `select id::text as id from ${table.quoted} where ${livePredicate(table)} order by id`,
    );
    return new Set(result.rows.map((row) => row.id));
  });
}

/** How many rows are dead now (revoked or used, or expired) on the database clock. */
export async function deadCount(database: DatabaseTarget, options: TableOptions): Promise<number> {
  return withClient(database, async (client) => {
    const table = await readTableShape(client, options);
    const result = await client.query<{ count: string }>(
      `select count(*) as count from ${table.quoted} where not (${livePredicate(table)})`,
    );
    return Number(result.rows[0]?.count ?? 0);
  });
}

/** Ids of every row in the table, in id order: compare with liveIds taken before a sweep. */
export async function allIds(
  database: DatabaseTarget,
  options: Pick<TableOptions, 'table'>,
): Promise<Set<string>> {
  return withClient(database, async (client) => {
    const quoted = quoteTable(options.table);
    const result = await client.query<{ id: string }>(
      `select id::text as id from ${quoted} order by id`,
    );
    return new Set(result.rows.map((row) => row.id));
  });
}

/** A quoted, schema-qualified table name for SQL. */
export function quoteTable(table: TableName): string {
  const { schema, name } = splitTableName(table);
  return schema === undefined
    ? pg.escapeIdentifier(name)
    : `${pg.escapeIdentifier(schema)}.${pg.escapeIdentifier(name)}`;
}

function splitTableName(table: TableName): { schema?: string; name: string } {
  if (typeof table !== 'string') return table;
  const dot = table.indexOf('.');
  return dot === -1 ? { name: table } : { schema: table.slice(0, dot), name: table.slice(dot + 1) };
}

/** Live means: not revoked (or used) yet, and not expired, both by now(). */
function livePredicate(table: TableShape): string {
  const flag = pg.escapeIdentifier(table.flagColumn);
  const notFlagged =
    table.shape === 'boolean' ? `not ${flag}` : `(${flag} is null or ${flag} > now())`;
  return `${notFlagged} and expires_at >= now()`;
}

async function readTableShape(client: pg.ClientBase, options: TableOptions): Promise<TableShape> {
  const quoted = quoteTable(options.table);
  const result = await client.query<{ exists: boolean; column_name: string | null }>(
    `select to_regclass($1) is not null as exists, attribute.attname as column_name
     from (select 1) as one
     left join pg_attribute as attribute
       on attribute.attrelid = to_regclass($1)
      and attribute.attnum > 0
      and not attribute.attisdropped
      and attribute.attname in ('revoked', 'revoked_at', 'used', 'used_at')`,
    [quoted],
  );
  if (result.rows[0]?.exists !== true) throw new Error(`table ${quoted} does not exist`);
  const columns = result.rows.flatMap((row) => (row.column_name === null ? [] : [row.column_name]));
  const [flagColumn, ...others] = columns;
  if (flagColumn === undefined || others.length > 0) {
    throw new Error(
      `${quoted} needs exactly one of the columns revoked, revoked_at, used, used_at; it has ${
        columns.length === 0 ? 'none' : columns.join(', ')
      }`,
    );
  }
  const shape: FlagShape = flagColumn.endsWith('_at') ? 'timestamp' : 'boolean';
  const kind: TableKind = flagColumn.startsWith('revoked') ? 'refresh_tokens' : 'password_resets';
  if (options.kind !== undefined && options.kind !== kind) {
    throw new Error(
      `${quoted} is a ${kind} table (it has ${flagColumn}), not a ${options.kind} one`,
    );
  }
  if (options.shape !== undefined && options.shape !== shape) {
    throw new Error(
      `${quoted} has the ${shape} shape (${flagColumn}), not the ${options.shape} shape`,
    );
  }
  const kinds: TableShape['kinds'] =
    kind === 'refresh_tokens'
      ? ['live', 'expired', 'revoked', 'expiredAndRevoked']
      : ['live', 'expired', 'used', 'expiredAndUsed'];
  return { quoted, flagColumn, shape, kinds };
}

function kindShares(
  table: TableShape,
  fractions: Partial<Record<RowKind, number>> | undefined,
): readonly number[] {
  if (fractions === undefined) return DEFAULT_SHARES;
  const unknown = Object.keys(fractions).filter((kind) => !table.kinds.includes(kind as RowKind));
  if (unknown.length > 0) {
    throw new Error(
      `${table.quoted} has the kinds ${table.kinds.join(', ')}; ${unknown.join(', ')} is not one of them`,
    );
  }
  const shares = table.kinds.map((kind) => fractions[kind] ?? 0);
  const sum = shares.reduce((total, share) => total + share, 0);
  if (shares.some((share) => share < 0) || Math.abs(sum - 1) > 1e-9) {
    throw new Error(
      `fractions must be non-negative and sum to 1, not ${JSON.stringify(fractions)}`,
    );
  }
  return shares;
}

/** Splits `count` by `shares` into whole numbers that add up to `count` (largest remainder). */
function splitCount(count: number, shares: readonly number[]): number[] {
  const exact = shares.map((share) => share * count);
  const counts = exact.map(Math.floor);
  let missing = count - counts.reduce((total, part) => total + part, 0);
  const byRemainder = exact
    .map((value, index) => ({ index, remainder: value - Math.floor(value) }))
    .sort((left, right) => right.remainder - left.remainder);
  for (const { index } of byRemainder) {
    if (missing <= 0) break;
    counts[index] = (counts[index] ?? 0) + 1;
    missing -= 1;
  }
  return counts;
}

async function withClient<T>(
  database: DatabaseTarget,
  work: (client: pg.ClientBase) => Promise<T>,
): Promise<T> {
  const pool = database instanceof pg.Pool ? database : 'pool' in database ? database.pool : null;
  if (pool === null) return work(database as pg.ClientBase);
  const client = await pool.connect();
  try {
    return await work(client);
  } finally {
    client.release();
  }
}

export interface PartitionedTableOptions {
  /** Days from today (UTC) of the first partition and just past the last; today is always made. */
  readonly fromDay: number;
  readonly toDay: number;
  /** Also a DEFAULT partition. */
  readonly withDefault?: boolean;
  /**
   * Create the table as this role, in `schema`, which must exist and let it create there.
   * Without it the schema is created, and the table belongs to the test's superuser.
   */
  readonly owner?: string;
}

/**
 * The refresh-tokens table sql/schemas/ ships for new deployments (daily partitions by
 * expiry, with today's), in `schema`, with a partition for each further day in
 * [fromDay, toDay), named as token-reaper names the ones it makes.
 */
export async function createPartitionedTable(
  database: DatabaseTarget,
  schema: string,
  options: PartitionedTableOptions,
): Promise<void> {
  const file = await readFile(
    new URL('../../sql/schemas/refresh-tokens-partitioned.sql', import.meta.url),
    'utf8',
  );
  await withClient(database, async (client) => {
    await client.query('BEGIN');
    try {
      if (options.owner === undefined) {
        await client.query(`CREATE SCHEMA ${pg.escapeIdentifier(schema)}`);
      } else {
        await client.query(`SET LOCAL ROLE ${pg.escapeIdentifier(options.owner)}`);
      }
      await client.query(`SET LOCAL search_path TO ${pg.escapeIdentifier(schema)}`);
      await client.query(file);
      await client.query(`
        DO $$
        DECLARE
          today timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
          day timestamptz;
        BEGIN
          FOR offset_days IN ${options.fromDay}..${options.toDay - 1} LOOP
            CONTINUE WHEN offset_days = 0;
            day := today + offset_days * interval '1 day';
            EXECUTE format('CREATE TABLE %I PARTITION OF refresh_tokens FOR VALUES FROM (%L) TO (%L)',
              'refresh_tokens_p' || to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD'), day, day + interval '1 day');
          END LOOP;
        END $$`);
      if (options.withDefault) {
        await client.query(
          `CREATE TABLE refresh_tokens_default PARTITION OF refresh_tokens DEFAULT`,
        );
      }
      await client.query('COMMIT');
    } catch (error) {
      await client.query('ROLLBACK');
      throw error;
    }
  });
}

/**
 * `rows` tokens spread over (now - pastDays, now + futureDays), each an hour clear of now so
 * that none changes state during a test, 20% of them revoked: rows for every day partition.
 */
export async function insertSpreadRows(
  database: DatabaseTarget,
  table: string,
  options: { rows: number; pastDays: number; futureDays: number },
): Promise<void> {
  await withClient(database, (client) =>
    client.query(
      `INSERT INTO ${quoteTable(table)} (user_id, token_hash, revoked, expires_at)
       SELECT gen_random_uuid(), md5(random()::text || i), random() < 0.2,
              now() + CASE WHEN random() < 0.5
                           THEN -(interval '1 hour' + random() * ($2 * interval '1 day' - interval '2 hours'))
                           ELSE interval '1 hour' + random() * ($3 * interval '1 day' - interval '2 hours') END
       FROM generate_series(1, $1::int) i`,
      [options.rows, options.pastDays, options.futureDays],
    ),
  );
}

const DAY_MS = 86_400_000;

/** The UTC day of a partition named <table>_pYYYYMMDD, in days from today; null for others. */
export function dayOffset(name: string): number | null {
  const match = /_p(\d{4})(\d{2})(\d{2})$/.exec(name);
  if (!match) return null;
  const day = Date.UTC(Number(match[1]), Number(match[2]) - 1, Number(match[3]));
  const today = Math.floor(Date.now() / DAY_MS) * DAY_MS;
  return Math.round((day - today) / DAY_MS);
}

/**
 * On one connection: revokes `rolledBack` in a transaction that rolls back, then revokes and
 * restores `restored` in one that commits. Neither may be purged: the first was never
 * revoked, and the second is not revoked any more (its revocation still reaches the daemon).
 */
export async function revokeThenUndo(
  client: Pick<pg.ClientBase, 'query'>,
  rolledBack: string,
  restored: string,
): Promise<void> {
  await client.query('BEGIN');
  await client.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [rolledBack]);
  await client.query('ROLLBACK');
  await client.query('BEGIN');
  await client.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [restored]);
  await client.query('UPDATE refresh_tokens SET revoked = false WHERE id = $1', [restored]);
  await client.query('COMMIT');
}

/** Revokes one live refresh token of the reference table and waits until it is purged. */
export async function revokeAndAwaitPurge(database: TestDatabaseHandle): Promise<void> {
  const [token] = await database.query(
    `UPDATE refresh_tokens SET revoked = true
     WHERE id = (SELECT id FROM refresh_tokens WHERE NOT revoked AND expires_at > now() LIMIT 1)
     RETURNING id::text`,
  );
  await waitFor(
    async () =>
      (await database.query('SELECT 1 FROM refresh_tokens WHERE id = $1', [token!.id])).length ===
      0,
    { message: 'the revoked token to be purged' },
  );
}
