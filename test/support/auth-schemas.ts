// The auth systems' real schemas (test/fixtures/auth-schemas, transcribed from their own
// migrations), and rows for any table of them: a filler that reads the catalog, so that a test
// names only the columns its rule is about.
import { readFile } from 'node:fs/promises';
import pg from 'pg';
import type { TestDatabaseHandle } from './database.js';
import { repositoryRoot } from './cli.js';

export interface Fill {
  /** The table, as SQL (qualified where it is not on the search_path). */
  table: string;
  /** Column → SQL expression per row (`g` is the row number); other columns get a filler. */
  values: Record<string, string>;
  /** Default 1. */
  rows?: number;
}

/** Runs one fixture file, e.g. `laravel-passport.sql`, on the client's database. */
export async function loadAuthSchema(client: pg.Client, fixture: string) {
  await client.query(
    await readFile(`${repositoryRoot}test/fixtures/auth-schemas/${fixture}`, 'utf8'),
  );
}

interface ColumnFact {
  name: string;
  type: string;
  typeId: string;
  length: number | null;
  foreignTable: string | null;
  foreignColumn: string | null;
}

/**
 * Inserts rows into any table: each NOT NULL column without a default gets a value of its
 * type, a foreign key the key of a row of its parent (which gets one row the same way), and
 * `values` override any column.
 */
export async function fillTable(client: pg.Client, fill: Fill, filled = new Set<string>()) {
  const columns = await client.query<ColumnFact>(
    `SELECT a.attname AS name, format_type(a.atttypid, NULL) AS type, a.atttypid::regtype::text AS "typeId",
            CASE WHEN a.atttypmod > 4 AND a.atttypid IN ('bpchar'::regtype, 'varchar'::regtype) THEN a.atttypmod - 4 END AS length,
            fk.foreign_table AS "foreignTable", fk.foreign_column AS "foreignColumn"
     FROM pg_attribute a
     LEFT JOIN LATERAL (
       SELECT con.confrelid::regclass::text AS foreign_table, fa.attname AS foreign_column
       FROM pg_constraint con
       JOIN pg_attribute fa ON fa.attrelid = con.confrelid
         AND fa.attnum = con.confkey[array_position(con.conkey, a.attnum)]
       WHERE con.conrelid = a.attrelid AND con.contype = 'f' AND a.attnum = ANY (con.conkey)
       LIMIT 1) fk ON true
     WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''`,
    [fill.table],
  );
  const expressions = new Map<string, string>();
  for (const column of columns.rows) {
    const quoted = `"${column.name}"`;
    if (column.foreignTable !== null) {
      if (!filled.has(column.foreignTable)) {
        filled.add(column.foreignTable);
        await fillTable(client, { table: column.foreignTable, values: {}, rows: 1 }, filled);
      }
      expressions.set(
        quoted,
        `(SELECT "${column.foreignColumn}" FROM ${column.foreignTable} LIMIT 1)`,
      );
    } else if (column.type === 'uuid') expressions.set(quoted, 'gen_random_uuid()');
    else if (column.type === 'boolean') expressions.set(quoted, 'false');
    else if (['integer', 'bigint', 'smallint'].includes(column.type)) expressions.set(quoted, 'g');
    else if (column.type.startsWith('timestamp')) expressions.set(quoted, 'now()');
    else if (column.type === 'jsonb' || column.type === 'json') expressions.set(quoted, `'[]'`);
    else if (['text', 'character varying', 'character'].includes(column.type)) {
      expressions.set(
        quoted,
        `left(md5(random()::text || g) || md5(g::text), ${column.length ?? 64})`,
      );
    } else {
      // An enum: its first label.
      expressions.set(quoted, `(enum_range(NULL::${column.typeId}))[1]`);
    }
  }
  for (const [column, value] of Object.entries(fill.values)) {
    expressions.set(column.startsWith('"') ? column : `"${column}"`, value);
  }
  await client.query(
    `INSERT INTO ${fill.table} (${[...expressions.keys()].join(', ')})
     SELECT ${[...expressions.values()].join(', ')} FROM generate_series(1, ${fill.rows ?? 1}) g`,
  );
}

/** Every row of each table, by its primary key as text. */
export async function rowKeys(client: pg.Client, tables: readonly string[]) {
  const keys = new Map<string, string[]>();
  for (const table of tables) {
    const key = await client.query<{ columns: string[] }>(
      `SELECT array_agg(a.attname::text ORDER BY a.attnum) AS columns FROM pg_index i
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
       WHERE i.indrelid = $1::regclass AND i.indisprimary`,
      [table],
    );
    const columns = key.rows[0]!.columns.map((column) => `"${column}"::text`).join(` || '|' || `);
    const rows = await client.query<{ key: string }>(`SELECT ${columns} AS key FROM ${table}`);
    keys.set(table, rows.rows.map((row) => row.key).sort());
  }
  return keys;
}

/**
 * A client on the block's database, set to Asia/Tokyo (a zone that is not UTC), with a
 * fixture loaded (or other SQL run) and filled. The block's database is dropped, with its
 * sessions, before the client ends, so the client ignores that error.
 */
export async function openAuthDatabase(
  database: TestDatabaseHandle,
  setup: { fixture?: string; sql?: string; fills: readonly Fill[]; rows?: number },
): Promise<pg.Client> {
  await database.query(`ALTER DATABASE ${database.name} SET timezone = 'Asia/Tokyo'`);
  const client = new pg.Client({ connectionString: database.url });
  client.on('error', () => undefined);
  await client.connect();
  if (setup.fixture !== undefined) await loadAuthSchema(client, setup.fixture);
  if (setup.sql !== undefined) await client.query(setup.sql);
  const filled = new Set<string>();
  for (const fill of setup.fills) {
    await fillTable(client, { rows: setup.rows ?? 1, ...fill }, filled);
  }
  return client;
}
