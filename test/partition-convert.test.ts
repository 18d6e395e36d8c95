// `partition convert` on a real PostgreSQL: a plain table becomes partitioned by day of expiry
// without a copy, while writers insert and revoke beside it, and nothing they do fails or is
// lost; the sweep takes over afterwards; tables it cannot convert safely are refused.
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { expect } from 'chai';
import pg from 'pg';
import { loadConfig } from '../src/config.js';
import { createDatabasePool } from '../src/db.js';
import { describeTarget } from '../src/schema.js';
import { createCapturingLogger } from './support/capture-logger.js';
import { repositoryRoot, runCli, waitFor, type CliResult, type LogLine } from './support/cli.js';
import { useTestDatabase, withServerClient, type TestDatabase } from './support/database.js';
import { allIds, createReferenceSchema, insertRandomRows, liveIds } from './support/fixtures.js';

const DAY_MS = 86_400_000;

function succeeded(result: CliResult) {
  expect(result.code, `${result.stderr}\n${result.stdout}`).to.equal(0);
  return result;
}

function converted(result: CliResult, table: string) {
  const line = result.logs.find(
    (candidate) => candidate.event === 'partition.converted' && candidate['table'] === table,
  );
  expect(line, result.stdout).not.to.equal(undefined);
  return line as LogLine & {
    lockMs: number;
    bound: string;
    legacyPartition: string;
    partitionsCreated: string[];
  };
}

/** A role of this run only: roles belong to the whole server, not to the test's database. */
async function createRole(database: TestDatabase, cleanup: (() => Promise<void>)[]) {
  const role = `convert_${randomBytes(4).toString('hex')}`;
  await database.query(`CREATE ROLE ${role}`);
  cleanup.push(async () => {
    await database.query(`REASSIGN OWNED BY ${role} TO CURRENT_USER`);
    await database.query(`DROP OWNED BY ${role}`);
    await withServerClient((client) => client.query(`DROP ROLE ${role}`));
  });
  return role;
}

async function partitionsOf(database: TestDatabase, table: string) {
  return database.query<{ name: string; bound: string }>(
    `SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = $1::regclass ORDER BY c.relname`,
    [table],
  );
}

async function relationKind(database: TestDatabase, table: string) {
  const rows = await database.query<{ kind: string }>(
    `SELECT relkind::text AS kind FROM pg_class WHERE oid = $1::regclass`,
    [table],
  );
  return rows[0]?.kind;
}

/** Every index of the table's partitions and what it is attached to, for comparison. */
async function indexesOf(database: TestDatabase, table: string) {
  return database.query<{ table: string; name: string; valid: boolean; parent: string | null }>(
    `SELECT t.relname AS table, c.relname AS name, i.indisvalid AS valid, p.relname AS parent
     FROM pg_index i
     JOIN pg_class c ON c.oid = i.indexrelid
     JOIN pg_class t ON t.oid = i.indrelid
     LEFT JOIN pg_inherits h ON h.inhrelid = c.oid
     LEFT JOIN pg_class p ON p.oid = h.inhparent
     WHERE i.indrelid = $1::regclass
        OR i.indrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::regclass)
     ORDER BY t.relname, c.relname`,
    [table],
  );
}

/** The catalog entries a conversion would change, to show that --print changed none. */
async function catalogSnapshot(database: TestDatabase, schema: string) {
  return database.query(
    `SELECT c.relname, c.relkind::text,
            ARRAY(SELECT conname::text FROM pg_constraint WHERE conrelid = c.oid ORDER BY 1) AS constraints,
            ARRAY(SELECT tgname::text FROM pg_trigger WHERE tgrelid = c.oid ORDER BY 1) AS triggers
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = $1 ORDER BY c.relname`,
    [schema],
  );
}

interface Writer {
  readonly inserted: string[];
  readonly revoked: string[];
  readonly errors: string[];
  readonly writes: number;
  readonly slowestMs: number;
  stop(): Promise<void>;
}

/**
 * The auth service: two connections that insert 30-day tokens and revoke live ones as fast as
 * they can, recording every write and every error. One of them uses named prepared statements,
 * as many drivers and ORMs do, to show that they survive the swap.
 */
function startWriter(database: TestDatabase, table: string, liveSample: readonly string[]): Writer {
  const inserted: string[] = [];
  const revoked: string[] = [];
  const errors: string[] = [];
  let writes = 0;
  let slowestMs = 0;
  let running = true;
  const write = async (connection: number) => {
    const client = await database.pool.connect();
    const prepared = (name: string) => (connection === 0 ? { name } : {});
    try {
      for (let iteration = 0; running; iteration += 1) {
        const started = performance.now();
        try {
          if (iteration % 2 === 0) {
            const result = await client.query<{ id: string }>({
              ...prepared('convert-test-insert'),
              text: `INSERT INTO ${table} (user_id, token_hash, expires_at)
                     VALUES (gen_random_uuid(), md5(random()::text), now() + interval '30 days')
                     RETURNING id::text AS id`,
            });
            inserted.push(result.rows[0]!.id);
          } else {
            const pool = iteration % 4 === 1 || inserted.length === 0 ? liveSample : inserted;
            const id = pool[Math.floor(Math.random() * pool.length)]!;
            await client.query({
              ...prepared('convert-test-revoke'),
              text: `UPDATE ${table} SET revoked = true WHERE id = $1`,
              values: [id],
            });
            revoked.push(id);
          }
        } catch (error) {
          errors.push((error as Error).message);
        }
        writes += 1;
        slowestMs = Math.max(slowestMs, performance.now() - started);
      }
    } finally {
      client.release();
    }
  };
  const done = Promise.all([write(0), write(1)]);
  return {
    inserted,
    revoked,
    errors,
    get writes() {
      return writes;
    },
    get slowestMs() {
      return slowestMs;
    },
    stop: async () => {
      running = false;
      await done;
    },
  };
}

/** Collects NOTIFY payloads on a channel through a connection of its own. */
async function listen(database: TestDatabase, channel: string) {
  const client = new pg.Client({ connectionString: database.url });
  await client.connect();
  const payloads: { table: string; id: string }[] = [];
  client.on('notification', (message) => payloads.push(JSON.parse(message.payload ?? 'null')));
  await client.query(`LISTEN ${pg.escapeIdentifier(channel)}`);
  return { payloads, close: () => client.end() };
}

describe('partition convert', () => {
  const database = useTestDatabase('partition_convert');
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    while (cleanup.length > 0) await cleanup.pop()!();
  });

  const environment = (table: string, extra: Record<string, string> = {}) => ({
    DATABASE_URL: database.url,
    REFRESH_TOKENS_TABLE: table,
    PASSWORD_RESETS_TABLE: 'none',
    ...extra,
  });

  it('converts a 1,000,000-row table while the auth service writes: no write fails, no row is lost, and the lock is held well under a second', async function () {
    this.timeout(180_000);
    const table = 'big.refresh_tokens';
    await createReferenceSchema(database.current, { schema: 'big', passwordResetsTable: null });
    await insertRandomRows(database.current, { table, count: 1_000_000, seed: 0.25 });
    succeeded(await runCli(['install'], environment(table), { timeoutMs: 60_000 }));
    const reader = await createRole(database.current, cleanup);
    await database.query(`GRANT SELECT ON ${table} TO ${reader}`);
    // install's indexes, which the partitioned table must adopt rather than build again.
    const installIndexes = await database.query<{ name: string; oid: number }>(
      `SELECT relname AS name, oid::int AS oid FROM pg_class
       WHERE relnamespace = 'big'::regnamespace
         AND relname IN ('refresh_tokens_expires_at_idx', 'refresh_tokens_revoked_idx')
       ORDER BY relname`,
    );
    expect(installIndexes).to.have.length(2);
    await database.query(`CREATE TABLE big.expected_ids AS SELECT id FROM ${table}`);
    const liveSample = (
      await database.query<{ id: string }>(
        `SELECT id::text AS id FROM ${table} WHERE NOT revoked AND expires_at > now() LIMIT 20000`,
      )
    ).map((row) => row.id);

    const writer = startWriter(database.current, table, liveSample);
    let result: CliResult;
    try {
      await waitFor(() => writer.writes >= 100, { message: 'the writer to get going' });
      result = await runCli(['partition', 'convert'], environment(table), { timeoutMs: 120_000 });
      const writesAtEnd = writer.writes;
      await waitFor(() => writer.writes >= writesAtEnd + 100, {
        message: 'writes into the partitioned table',
      });
    } finally {
      await writer.stop();
    }

    succeeded(result);
    expect(writer.errors, 'failed writes').to.deep.equal([]);
    const report = converted(result, table);
    expect(report.lockMs, 'ms the ACCESS EXCLUSIVE lock was held').to.be.below(1_000);
    // What the auth service saw: its slowest write, waiting behind the swap included.
    expect(writer.slowestMs, 'ms of the slowest write').to.be.below(1_000);
    const steps = result.logs.filter((line) => line.event === 'partition.step');
    expect(steps.map((line) => line['step'])).to.deep.equal([
      'build_index',
      'build_index',
      'add_check',
      'validate_check',
      'swap',
    ]);

    // Every row that was there, and every row the writer inserted, is there; nothing else is.
    await database.query(`INSERT INTO big.expected_ids SELECT unnest($1::uuid[])`, [
      writer.inserted,
    ]);
    const [rows] = await database.query<{ missing: number; expected: number; present: number }>(
      `SELECT (SELECT count(*)::int FROM big.expected_ids e
               WHERE NOT EXISTS (SELECT 1 FROM ${table} t WHERE t.id = e.id)) AS missing,
              (SELECT count(*)::int FROM big.expected_ids) AS expected,
              (SELECT count(*)::int FROM ${table}) AS present`,
    );
    expect(rows).to.deep.equal({
      missing: 0,
      expected: 1_000_000 + writer.inserted.length,
      present: rows!.expected,
    });
    const [notRevoked] = await database.query<{ count: number }>(
      `SELECT count(*)::int AS count FROM ${table} WHERE id = ANY($1::uuid[]) AND NOT revoked`,
      [writer.revoked],
    );
    expect(notRevoked!.count, 'revocations lost').to.equal(0);

    // Partitioned by day of expiry: the legacy partition up to the bound, days from it on.
    expect(await relationKind(database.current, table)).to.equal('p');
    const partitions = await partitionsOf(database.current, table);
    const bound = Date.parse(report.bound);
    expect(bound % DAY_MS, 'the bound is a UTC midnight').to.equal(0);
    // The fixture's tokens expire up to 30 days ahead; the bound is a day or two beyond.
    expect(bound - Date.now()).to.be.within(31 * DAY_MS - 60_000, 33 * DAY_MS);
    const legacy = partitions.find((partition) => partition.name === 'refresh_tokens_legacy');
    expect(legacy?.bound).to.match(/^FOR VALUES FROM \(MINVALUE\) TO \('/);
    const days = partitions.filter((partition) => partition.name !== 'refresh_tokens_legacy');
    expect(days.map((partition) => partition.name)).to.deep.equal(
      days.map((_, day) => `refresh_tokens_p${ymd(bound + day * DAY_MS)}`),
    );
    expect(days.length).to.be.at.least(1);
    expect(report.partitionsCreated).to.deep.equal(
      days.map((partition) => `big.${partition.name}`),
    );

    // The parent's indexes adopted the legacy table's: no index was built under the lock (a
    // built one would be a sixth index on the legacy partition), and install's two kept
    // their identity.
    const indexes = (await indexesOf(database.current, table)).filter(
      (index) => index.table === 'refresh_tokens' || index.table === 'refresh_tokens_legacy',
    );
    expect(indexes).to.deep.equal([
      { table: 'refresh_tokens', name: 'refresh_tokens_expires_at_idx', valid: true, parent: null },
      { table: 'refresh_tokens', name: 'refresh_tokens_pkey', valid: true, parent: null },
      { table: 'refresh_tokens', name: 'refresh_tokens_revoked_idx', valid: true, parent: null },
      { table: 'refresh_tokens', name: 'refresh_tokens_token_hash_idx', valid: true, parent: null },
      {
        table: 'refresh_tokens_legacy',
        name: 'refresh_tokens_legacy_expires_at_idx',
        valid: true,
        parent: 'refresh_tokens_expires_at_idx',
      },
      {
        table: 'refresh_tokens_legacy',
        name: 'refresh_tokens_legacy_pkey',
        valid: true,
        parent: 'refresh_tokens_pkey',
      },
      {
        table: 'refresh_tokens_legacy',
        name: 'refresh_tokens_legacy_revoked_idx',
        valid: true,
        parent: 'refresh_tokens_revoked_idx',
      },
      {
        table: 'refresh_tokens_legacy',
        name: 'refresh_tokens_legacy_token_hash_idx',
        valid: true,
        parent: 'refresh_tokens_token_hash_idx',
      },
      // The unique constraint stays on the legacy partition, enforced among its rows.
      {
        table: 'refresh_tokens_legacy',
        name: 'refresh_tokens_legacy_token_hash_key',
        valid: true,
        parent: null,
      },
    ]);
    const keptIndexes = await database.query<{ name: string; oid: number }>(
      `SELECT relname AS name, oid::int AS oid FROM pg_class
       WHERE oid = ANY($1::oid[]) ORDER BY relname`,
      [installIndexes.map((index) => index.oid)],
    );
    expect(keptIndexes.map((index) => index.name)).to.deep.equal([
      'refresh_tokens_legacy_expires_at_idx',
      'refresh_tokens_legacy_revoked_idx',
    ]);
    const [constraints] = await database.query<{ names: string[] }>(
      `SELECT array_agg(conname::text ORDER BY conname) AS names FROM pg_constraint
       WHERE conrelid = 'big.refresh_tokens_legacy'::regclass AND contype IN ('c', 'p', 'u')`,
    );
    expect(constraints!.names, 'the bound CHECK is gone').to.deep.equal([
      'refresh_tokens_legacy_pkey',
      'refresh_tokens_legacy_token_hash_key',
    ]);

    // The revoke trigger notifies from the partitioned table, for a row in the legacy
    // partition and for one in a daily partition, both naming the table the daemon knows.
    const listener = await listen(database.current, 'refresh_token_revoked');
    cleanup.push(() => listener.close());
    const [dayRow] = await database.query<{ id: string }>(
      `INSERT INTO ${table} (user_id, token_hash, expires_at)
       VALUES (gen_random_uuid(), md5(random()::text), $1::timestamptz + interval '1 hour')
       RETURNING id::text AS id`,
      [report.bound],
    );
    const legacyId = liveSample.find((id) => !writer.revoked.includes(id))!;
    await database.query(`UPDATE ${table} SET revoked = true WHERE id = ANY($1::uuid[])`, [
      [legacyId, dayRow!.id],
    ]);
    await waitFor(() => listener.payloads.length >= 2, { message: 'two NOTIFYs' });
    expect(listener.payloads.map(({ table: from, id }) => ({ from, id }))).to.have.deep.members([
      { from: 'big.refresh_tokens', id: legacyId },
      { from: 'big.refresh_tokens', id: dayRow!.id },
    ]);

    // The grant came along.
    const [privilege] = await database.query<{ granted: boolean }>(
      `SELECT has_table_privilege($1, $2, 'SELECT') AS granted`,
      [reader, table],
    );
    expect(privilege!.granted).to.equal(true);
  });

  it('hands the table to the sweep: the partition strategy deletes the dead rows and keeps every live one', async function () {
    this.timeout(60_000);
    const table = 'swept.refresh_tokens';
    await createReferenceSchema(database.current, { schema: 'swept', passwordResetsTable: null });
    await insertRandomRows(database.current, { table, count: 20_000, seed: 0.5 });
    // A serial column, an owner other than the converter, and a column privilege: the parts
    // of a table that a LIKE copy leaves behind.
    await database.query(`ALTER TABLE ${table} ADD COLUMN serial_number bigserial`);
    const owner = await createRole(database.current, cleanup);
    const auditor = await createRole(database.current, cleanup);
    await database.query(`ALTER TABLE ${table} OWNER TO ${owner}`);
    await database.query(`GRANT SELECT (id, expires_at) ON ${table} TO ${auditor}`);
    succeeded(await runCli(['install'], environment(table)));
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });

    const conversion = succeeded(await runCli(['partition', 'convert'], environment(table)));
    const report = converted(conversion, table);
    const config = loadConfig(environment(table));
    const pool = await createDatabasePool(config, createCapturingLogger().logger, {
      maximumPoolSize: 1,
    });
    try {
      const shape = (await describeTarget(pool, config.targets[0]!, config))!;
      expect(shape).to.include({ partitioned: true, partitionedByExpiry: true });
      expect(shape.revokeTriggerInstalled).to.equal(true);
    } finally {
      await pool.end();
    }

    const sweep = succeeded(await runCli(['sweep'], environment(table)));
    const finished = sweep.logs.find((line) => line.event === 'sweep.finished')!;
    const tables = finished['tables'] as Record<string, { deleted: number; partitions?: unknown }>;
    expect(tables[table]!.partitions, 'the partition strategy ran').not.to.equal(undefined);
    expect(tables[table]!.deleted).to.equal(20_000 - live.size);
    expect(await allIds(database.current, { table })).to.deep.equal(live);

    // The sequence belongs to the partitioned table now and goes on counting.
    const [row] = await database.query<{ serial: number }>(
      `INSERT INTO ${table} (user_id, token_hash, expires_at)
       VALUES (gen_random_uuid(), 'a new token', now() + interval '1 day')
       RETURNING serial_number::int AS serial`,
    );
    expect(row!.serial).to.be.greaterThan(20_000);
    const owners = await database.query<{ name: string; owner: string }>(
      `SELECT c.relname AS name, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
       WHERE c.oid = $1::regclass OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::regclass)`,
      [table],
    );
    expect(new Set(owners.map((entry) => entry.owner))).to.deep.equal(new Set([owner]));
    const [columnPrivileges] = await database.query<{ id: boolean; hash: boolean }>(
      `SELECT has_column_privilege($1, $2, 'id', 'SELECT') AS id,
              has_column_privilege($1, $2, 'token_hash', 'SELECT') AS hash`,
      [auditor, table],
    );
    expect(columnPrivileges).to.deep.equal({ id: true, hash: false });
    // install, run again, finds its indexes in place on every partition and builds nothing.
    const reinstall = succeeded(await runCli(['install'], environment(table)));
    expect(reinstall.logs.filter((line) => line.event === 'install.building_index')).to.deep.equal(
      [],
    );
    // Nothing depends on the legacy partition any more, so the sweep can drop it whole once its
    // bound has passed (here, inside a transaction that is rolled back).
    const client = await database.pool.connect();
    try {
      await client.query('BEGIN');
      await client.query(`DROP TABLE ${report.legacyPartition}`);
      await client.query('ROLLBACK');
    } finally {
      client.release();
    }
  });

  it('converts every configured table, an empty one included, checking a small table under the lock instead of with a CHECK', async () => {
    await createReferenceSchema(database.current, { schema: 'several' });
    await insertRandomRows(database.current, { table: 'several.password_resets', count: 500 });
    const env = environment('several.refresh_tokens', {
      PASSWORD_RESETS_TABLE: 'several.password_resets',
    });
    const result = succeeded(await runCli(['partition', 'convert'], env));

    for (const table of ['several.refresh_tokens', 'several.password_resets']) {
      converted(result, table);
      expect(await relationKind(database.current, table)).to.equal('p');
    }
    expect(result.logs.filter((line) => line['step'] === 'add_check')).to.deep.equal([]);
    const [warning] = result.logs.filter((line) => line.event === 'partition.warning');
    expect(warning).to.include({ table: 'several.refresh_tokens', level: 'warn' });
    expect(warning!.message).to.include('PARTITION_PREMAKE_DAYS');
    await database.query(
      `INSERT INTO several.refresh_tokens (user_id, token_hash, expires_at)
       VALUES (gen_random_uuid(), 'first', now() + interval '2 days')`,
    );

    // Run again: nothing is left to convert, which is a usage error.
    const again = await runCli(['partition', 'convert'], env);
    expect(again.code).to.equal(2);
    expect(again.stderr).to.include('several.refresh_tokens is already partitioned by expires_at');
    expect(again.stderr).to.include('several.password_resets is already partitioned by expires_at');
  });

  it('refuses a table that a foreign key references, naming the table and the reason, and changes nothing', async () => {
    await createReferenceSchema(database.current, {
      schema: 'referenced',
      passwordResetsTable: null,
    });
    await database.query(
      `CREATE TABLE referenced.sessions (token_id uuid REFERENCES referenced.refresh_tokens (id))`,
    );
    const before = await catalogSnapshot(database.current, 'referenced');
    const result = await runCli(['partition', 'convert'], environment('referenced.refresh_tokens'));
    expect(result.code, result.stderr).to.equal(2);
    expect(result.stderr).to.include(
      'referenced.sessions(token_id) → referenced.refresh_tokens(id), constraint sessions_token_id_fkey has no ON DELETE action',
    );
    expect(result.stderr).to.include('"onReferenced"');
    expect(await catalogSnapshot(database.current, 'referenced')).to.deep.equal(before);
  });

  it('refuses a table that is already partitioned', async () => {
    const file = await readFile(
      `${repositoryRoot}sql/schemas/refresh-tokens-partitioned.sql`,
      'utf8',
    );
    const client = await database.pool.connect();
    try {
      await client.query('CREATE SCHEMA shipped; SET search_path TO shipped');
      await client.query(file);
    } finally {
      await client.query('RESET search_path');
      client.release();
    }
    const result = await runCli(['partition', 'convert'], environment('shipped.refresh_tokens'));
    expect(result.code, result.stderr).to.equal(2);
    expect(result.stderr).to.include(
      'shipped.refresh_tokens is already partitioned by expires_at, and the sweep drops its expired partitions: there is nothing to convert.',
    );
  });

  it('prints the whole plan, the swap included, and changes nothing', async () => {
    const table = 'printed.refresh_tokens';
    await createReferenceSchema(database.current, { schema: 'printed', passwordResetsTable: null });
    await insertRandomRows(database.current, { table, count: 20_000 });
    const before = await catalogSnapshot(database.current, 'printed');
    const result = succeeded(await runCli(['partition', 'convert', '--print'], environment(table)));
    const sql = result.stdout;
    for (const expected of [
      'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "refresh_tokens_id_expires_at_key" ON "printed"."refresh_tokens" ("id", "expires_at");',
      'CREATE INDEX CONCURRENTLY IF NOT EXISTS "refresh_tokens_legacy_token_hash_idx" ON "printed"."refresh_tokens" USING btree (token_hash);',
      'VALIDATE CONSTRAINT "refresh_tokens_expires_at_bound";',
      'LOCK TABLE "printed"."refresh_tokens" IN ACCESS EXCLUSIVE MODE;',
      'ALTER TABLE "printed"."refresh_tokens" RENAME TO "refresh_tokens_legacy";',
      'ALTER TABLE "printed"."refresh_tokens" ATTACH PARTITION "printed"."refresh_tokens_legacy" FOR VALUES FROM (MINVALUE) TO (',
      'ALTER TABLE "printed"."refresh_tokens" ADD CONSTRAINT "refresh_tokens_pkey" PRIMARY KEY ("id", "expires_at");',
      'was computed now, on the database clock',
    ]) {
      expect(sql).to.include(expected);
    }
    expect(sql.indexOf('LOCK TABLE')).to.be.lessThan(sql.lastIndexOf('COMMIT;'));
    expect(result.logs).to.deep.equal([]);
    expect(await catalogSnapshot(database.current, 'printed')).to.deep.equal(before);
  });

  it('gives up on the lock within lock_timeout while a long transaction holds the table, and leaves it plain', async function () {
    this.timeout(60_000);
    const table = 'held.refresh_tokens';
    await createReferenceSchema(database.current, { schema: 'held', passwordResetsTable: null });
    await insertRandomRows(database.current, { table, count: 1_000 });
    // An auth transaction that read the table and stays open.
    const holder = await database.pool.connect();
    cleanup.push(async () => {
      await holder.query('ROLLBACK');
      holder.release();
    });
    await holder.query('BEGIN');
    await holder.query(`SELECT count(*) FROM ${table}`);
    const lockTimeoutMs = 100;
    const settings = {
      PARTITION_LOCK_TIMEOUT_MS: String(lockTimeoutMs),
      PARTITION_LOCK_ATTEMPTS: '3',
    };
    const started = performance.now();
    const failed = await runCli(['partition', 'convert'], environment(table, settings));
    expect(failed.code, failed.stderr).to.equal(1);
    expect(failed.stderr).to.include(
      `could not lock held.refresh_tokens within ${lockTimeoutMs} ms in 3 attempts`,
    );
    expect(failed.logs.filter((line) => line.event === 'partition.lock_timeout')).to.have.length(2);
    expect(performance.now() - started).to.be.below(15_000);
    expect(await relationKind(database.current, table)).to.equal('r');

    await holder.query('COMMIT');
    converted(succeeded(await runCli(['partition', 'convert'], environment(table))), table);
  });

  it('removes its CHECK when the swap fails, and a second run finishes the conversion', async () => {
    const table = 'retried.refresh_tokens';
    await createReferenceSchema(database.current, { schema: 'retried', passwordResetsTable: null });
    await insertRandomRows(database.current, { table, count: 20_000 });
    // A table in the way of the first daily partition makes the swap fail after the CHECK is
    // in place.
    const printed = succeeded(
      await runCli(['partition', 'convert', '--print'], environment(table)),
    );
    const day = /"(refresh_tokens_p\d{8})" PARTITION OF/.exec(printed.stdout)![1]!;
    await database.query(`CREATE TABLE retried.${day} (id int)`);

    const failed = await runCli(['partition', 'convert'], environment(table));
    expect(failed.code, failed.stderr).to.equal(1);
    expect(failed.stderr).to.include(`relation "${day}" already exists`);
    expect(failed.logs.map((line) => line['step']).filter(Boolean)).to.deep.equal([
      'build_index',
      'build_index',
      'add_check',
      'validate_check',
      'remove_check',
    ]);
    expect(await relationKind(database.current, table)).to.equal('r');
    const checks = await database.query(
      `SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'`,
      [table],
    );
    expect(checks).to.deep.equal([]);

    await database.query(`DROP TABLE retried.${day}`);
    const second = succeeded(await runCli(['partition', 'convert'], environment(table)));
    converted(second, table);
    expect(await relationKind(database.current, table)).to.equal('p');
    const indexes = await indexesOf(database.current, `retried.refresh_tokens_legacy`);
    expect(indexes.map((index) => index.name)).to.deep.equal([
      'refresh_tokens_legacy_pkey',
      'refresh_tokens_legacy_token_hash_idx',
      'refresh_tokens_legacy_token_hash_key',
    ]);
  });
});

function ymd(epochMs: number) {
  return new Date(epochMs).toISOString().slice(0, 10).replaceAll('-', '');
}
