// The two template databases every contender is copied from, built once per run:
//
// - plain: the reference schema's refresh_tokens (primary key, unique token_hash), filled with
//   insertRandomRows (dead rows shuffled over every page), then `token-reaper install`, the real
//   CLI, which adds the revoke trigger, the expiry index and the partial index on revoked rows;
// - partitioned: a copy of plain whose rows move into refresh_tokens_daily, PARTITION BY RANGE
//   (expires_at) with one partition per UTC day of the data and a DEFAULT partition, primary key
//   (id, expires_at), then `install` again for that table.
//
// Both end with VACUUM (FREEZE, ANALYZE): every contender starts with hint bits set, a visibility
// map and planner statistics, as an old production table would have, and none pays for work that
// the first reader of freshly loaded rows would otherwise do.
import pg from 'pg';

import { runCli } from '../support/cli.js';
import { createReferenceSchema, insertRandomRows, quoteTable } from '../support/fixtures.js';

import type { BenchDatabase, BenchServer } from './databases.js';
import { WORKLOAD_HASH_PREFIX } from './workload.js';

export const PLAIN_TABLE = 'refresh_tokens';
export const PARTITIONED_TABLE = 'refresh_tokens_daily';

/**
 * 52% dead, as in DESIGN.md (2,000,000 rows, about 1,040,000 dead), nearly all of it expired.
 * Revoked tokens that have not expired yet are what the purge daemon deletes within
 * milliseconds, so a sweep finds few of them: by default 0.2% of the rows, what failed purges
 * might leave. DESIGN.md's partitioned figures (31 expired days dropped, then 20 ms for the
 * revoked rows in the live days) fit only such a mix. That share decides how much a partitioned
 * table gains, because those rows sit on every page of the live partitions and cost a full-page
 * image each in the WAL; --revoked-unexpired sets it. Dead rows expire 1 hour to 30 days ago and
 * live rows 1 hour to 30 days ahead, so no row changes kind while the benchmark runs.
 */
const LIVE_SHARE = 0.48;
const EXPIRED_AND_REVOKED_SHARE = 0.02;
export const DEFAULT_REVOKED_UNEXPIRED_SHARE = 0.002;

function rowMix(revokedUnexpiredShare: number) {
  const dead = 1 - LIVE_SHARE;
  if (!(revokedUnexpiredShare >= 0 && revokedUnexpiredShare <= dead - EXPIRED_AND_REVOKED_SHARE)) {
    throw new Error(
      `the revoked-but-unexpired share must lie in [0, ${dead - EXPIRED_AND_REVOKED_SHARE}]`,
    );
  }
  return {
    live: LIVE_SHARE,
    expired: dead - EXPIRED_AND_REVOKED_SHARE - revokedUnexpiredShare,
    revoked: revokedUnexpiredShare,
    expiredAndRevoked: EXPIRED_AND_REVOKED_SHARE,
  };
}
/** The same rows on every run, so that runs on different days compare. */
const DATA_SEED = 0.42;
/** Pre-existing live tokens the workload looks up by hash. */
const LOOKUP_SAMPLE_SIZE = 2_000;
const INSTALL_TIMEOUT_MS = 10 * 60_000;

export interface Template {
  readonly kind: 'plain' | 'partitioned';
  readonly database: BenchDatabase;
  /** The unqualified table name, in the schema public. */
  readonly table: string;
  readonly rows: number;
  readonly liveRows: number;
  readonly deadRows: number;
  /** Dead rows that are revoked but not yet expired: what a partition drop cannot take. */
  readonly revokedUnexpiredRows: number;
  readonly heapPages: number;
  readonly totalBytes: number;
  /** Leaf partitions, counting the DEFAULT partition; 0 for the plain table. */
  readonly partitions: number;
}

export interface Templates {
  readonly plain: Template;
  /** null when no selected part needs it (only (d) does). */
  readonly partitioned: Template | null;
  /** Token hashes of live rows, the same in both templates. */
  readonly lookupHashes: readonly string[];
  /** Whether the pg_walinspect extension could be created (it is in both templates). */
  readonly walInspect: boolean;
}

export async function buildTemplates(
  server: BenchServer,
  rows: number,
  revokedUnexpiredShare: number,
  progress: (message: string) => void,
  withPartitioned = true,
): Promise<Templates> {
  const fractions = rowMix(revokedUnexpiredShare);
  progress(`building the plain template: ${rows.toLocaleString('en-US')} rows`);
  const plainDatabase = await server.createDatabase('template_plain');
  const plainPool = new pg.Pool({ connectionString: plainDatabase.url, max: 1 });
  try {
    await createReferenceSchema(plainPool, { passwordResetsTable: null });
    await insertRandomRows(plainPool, {
      table: PLAIN_TABLE,
      kind: 'refresh_tokens',
      count: rows,
      fractions,
      seed: DATA_SEED,
    });
  } finally {
    await plainPool.end();
  }
  await install(plainDatabase, PLAIN_TABLE);
  await plainDatabase.query(`VACUUM (FREEZE, ANALYZE) ${PLAIN_TABLE}`);
  // For wal.ts; a server without contrib gets the plain LSN difference instead.
  const walInspect = await plainDatabase
    .query('CREATE EXTENSION IF NOT EXISTS pg_walinspect')
    .then(() => true)
    .catch(() => false);
  const lookupHashes = (
    await plainDatabase.query<{ token_hash: string }>(
      `SELECT token_hash FROM ${PLAIN_TABLE} WHERE NOT revoked AND expires_at >= now()
       ORDER BY random() LIMIT ${LOOKUP_SAMPLE_SIZE}`,
    )
  ).map((row) => row.token_hash);
  const plain = await describeTemplate('plain', plainDatabase, PLAIN_TABLE);

  let partitioned: Template | null = null;
  if (withPartitioned) {
    progress('building the partitioned template: the same rows, one partition per day');
    const partitionedDatabase = await server.createDatabase('template_partitioned', plainDatabase);
    await buildPartitionedTable(partitionedDatabase);
    await install(partitionedDatabase, PARTITIONED_TABLE);
    await partitionedDatabase.query(`VACUUM (FREEZE, ANALYZE) ${PARTITIONED_TABLE}`);
    partitioned = await describeTemplate('partitioned', partitionedDatabase, PARTITIONED_TABLE);
    await server.freezeTemplate(partitionedDatabase);
  }

  await server.freezeTemplate(plainDatabase);
  return { plain, partitioned, lookupHashes, walInspect };
}

async function buildPartitionedTable(database: BenchDatabase) {
  const client = new pg.Client({ connectionString: database.url });
  await client.connect();
  try {
    // One partition per UTC day from the earliest to the latest expiry, plus DEFAULT for
    // tokens issued after the partitions run out (the workload's, which expire in 30 days).
    const days = await client.query<{ from: string; to: string; suffix: string }>(
      `SELECT day::text AS from, (day + interval '1 day')::text AS to,
              to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD') AS suffix
       FROM (SELECT date_trunc('day', min(expires_at), 'UTC') AS first,
                    date_trunc('day', max(expires_at), 'UTC') AS last
             FROM ${PLAIN_TABLE}) AS bounds,
            generate_series(first, last, interval '1 day') AS day`,
    );
    const parent = pg.escapeIdentifier(PARTITIONED_TABLE);
    const statements = [
      `CREATE TABLE ${parent} (
         id uuid NOT NULL DEFAULT gen_random_uuid(),
         user_id uuid NOT NULL,
         token_hash text NOT NULL,
         revoked boolean NOT NULL DEFAULT false,
         expires_at timestamptz NOT NULL,
         created_at timestamptz NOT NULL DEFAULT now())
       PARTITION BY RANGE (expires_at)`,
      ...days.rows.map(
        (day) =>
          `CREATE TABLE ${pg.escapeIdentifier(`${PARTITIONED_TABLE}_p${day.suffix}`)}
           PARTITION OF ${parent}
           FOR VALUES FROM (${pg.escapeLiteral(day.from)}) TO (${pg.escapeLiteral(day.to)})`,
      ),
      `CREATE TABLE ${pg.escapeIdentifier(`${PARTITIONED_TABLE}_default`)}
       PARTITION OF ${parent} DEFAULT`,
      // In the plain table's physical order, so dead rows spread over the pages of each
      // partition as they did over the plain table's.
      `INSERT INTO ${parent} SELECT * FROM ${PLAIN_TABLE}`,
      // Built after the load, which is faster. The token_hash index cannot be unique
      // without the partition key; DESIGN.md's conversion uses a plain one, so does this.
      `ALTER TABLE ${parent} ADD PRIMARY KEY (id, expires_at)`,
      `CREATE INDEX ${pg.escapeIdentifier(`${PARTITIONED_TABLE}_token_hash_idx`)}
       ON ${parent} (token_hash)`,
      // The plain table and its install record go: (d)'s copies hold only what (d) touches.
      `DROP TABLE ${PLAIN_TABLE}`,
      'DROP SCHEMA IF EXISTS token_reaper CASCADE',
    ];
    for (const statement of statements) await client.query(statement);
  } finally {
    await client.end();
  }
}

/** Runs the real `token-reaper install` for `table`. */
async function install(database: BenchDatabase, table: string) {
  const result = await runCli(
    ['install'],
    { DATABASE_URL: database.url, REFRESH_TOKENS_TABLE: table, PASSWORD_RESETS_TABLE: 'none' },
    { timeoutMs: INSTALL_TIMEOUT_MS },
  );
  if (result.code !== 0) {
    throw new Error(`token-reaper install failed for ${table}: ${result.stderr}${result.stdout}`);
  }
}

async function describeTemplate(
  kind: Template['kind'],
  database: BenchDatabase,
  table: string,
): Promise<Template> {
  const quoted = quoteTable(table);
  const [counts] = await database.query<{
    rows: string;
    live: string;
    revoked_unexpired: string;
    heap_pages: string;
    total_bytes: string;
    partitions: string;
  }>(
    `SELECT (SELECT count(*) FROM ${quoted} WHERE token_hash NOT LIKE $2) AS rows,
            (SELECT count(*) FROM ${quoted}
              WHERE token_hash NOT LIKE $2 AND NOT revoked AND expires_at >= now()) AS live,
            (SELECT count(*) FROM ${quoted}
              WHERE token_hash NOT LIKE $2 AND revoked AND expires_at >= now())
              AS revoked_unexpired,
            sum(pg_relation_size(relid)) / current_setting('block_size')::int AS heap_pages,
            sum(pg_total_relation_size(relid)) AS total_bytes,
            count(*) FILTER (WHERE $1::regclass <> relid) AS partitions
     FROM (SELECT relid FROM pg_partition_tree($1::regclass) WHERE isleaf
           UNION ALL  -- pg_partition_tree() lists nothing for a table that is not partitioned
           SELECT $1::regclass WHERE NOT EXISTS (SELECT FROM pg_partition_tree($1::regclass)))
       AS leaves`,
    [quoted, `${WORKLOAD_HASH_PREFIX}%`],
  );
  const rows = Number(counts!.rows);
  const liveRows = Number(counts!.live);
  return {
    kind,
    database,
    table,
    rows,
    liveRows,
    deadRows: rows - liveRows,
    revokedUnexpiredRows: Number(counts!.revoked_unexpired),
    heapPages: Number(counts!.heap_pages),
    totalBytes: Number(counts!.total_bytes),
    partitions: Number(counts!.partitions),
  };
}
