// Partition-style expiry on a real PostgreSQL, on the table sql/schemas/ ships for new
// deployments: expired days go whole, what stays is cleaned, days are made ahead, and a lock
// held by an auth transaction makes a drop give up instead of queueing the auth traffic.
import { expect } from 'chai';
import { loadConfig } from '../src/config.js';
import { createDatabasePool } from '../src/db.js';
import { createSweeper, type SweepOutcome } from '../src/sweep/sweeper.js';
import { createCapturingLogger } from './support/capture-logger.js';
import { runCli, spawnDaemon } from './support/cli.js';
import { useTestDatabase, type TestDatabase } from './support/database.js';
import {
  allIds,
  createPartitionedTable,
  dayOffset,
  insertSpreadRows,
  liveIds,
} from './support/fixtures.js';

const DAY_MS = 86_400_000;

async function partitionsOf(database: TestDatabase, table: string) {
  const rows = await database.query(
    `SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
     FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = $1::regclass ORDER BY c.relname`,
    [table],
  );
  return rows as { name: string; bound: string }[];
}

describe('partition-style expiry', () => {
  const database = useTestDatabase('partitions');
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    while (cleanup.length > 0) await cleanup.pop()!();
  });

  async function sweeperFor(environment: Record<string, string>) {
    const config = loadConfig({
      DATABASE_URL: database.url,
      NODE_ENV: 'test',
      PASSWORD_RESETS_TABLE: 'none',
      ...environment,
    });
    const logs = createCapturingLogger('debug');
    const pool = await createDatabasePool(config, logs.logger, { maximumPoolSize: 3 });
    const sweeper = createSweeper({ pool, config, logger: logs.logger });
    cleanup.push(async () => {
      await sweeper.stop();
      await pool.end();
    });
    return { sweeper, logs };
  }

  function finished(outcome: SweepOutcome) {
    if (outcome.status !== 'finished') throw new Error(JSON.stringify(outcome));
    return outcome;
  }

  it('drops exactly the expired days, deletes revoked rows in the rest, keeps every live row, and makes days ahead', async function () {
    this.timeout(60_000);
    const table = 'daily.refresh_tokens';
    await createPartitionedTable(database.current, 'daily', { fromDay: -40, toDay: 20 });
    // Day 19 ends at midnight, so rows reach 19 days ahead: the partitions hold them all.
    await insertSpreadRows(database.current, table, { rows: 30_000, pastDays: 40, futureDays: 19 });
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const before = await partitionsOf(database.current, table);
    expect(before).to.have.length(60);

    const { sweeper } = await sweeperFor({ REFRESH_TOKENS_TABLE: table });
    const outcome = finished(await sweeper.sweep('cli'));

    expect(await allIds(database.current, { table }), 'the rows left').to.deep.equal(live);
    const after = await partitionsOf(database.current, table);
    const offsets = after.map((partition) => dayOffset(partition.name)!).sort((a, b) => a - b);
    expect(offsets[0], 'the oldest day left').to.equal(0);
    // 19 days of tokens stored, plus 7 days of margin: made ahead without gaps.
    expect(offsets).to.deep.equal(Array.from({ length: offsets.length }, (_, day) => day));
    expect(offsets.at(-1)).to.be.at.least(25);
    const report = outcome.tables[table]!;
    expect(report.partitionsDropped).to.equal(40);
    expect(report.partitions!.partitionsCreated).to.have.length(after.length - 20);
    expect(report.partitions!.partitionsSkipped).to.deep.equal([]);
    expect(report.partitions!.estimatedRowsInRemovedPartitions).to.be.at.least(0);
    const revokedLeft = await database.query(
      `SELECT count(*)::int AS count FROM ${table} WHERE revoked`,
    );
    expect(revokedLeft[0]!.count).to.equal(0);

    // A second sweep finds nothing to do.
    const again = finished(await sweeper.sweep('cli')).tables[table]!;
    expect(again).to.include({ deleted: 0, partitionsDropped: 0 });
    expect(again.partitions!.partitionsCreated).to.deep.equal([]);
  });

  it('lists what it would drop in a dry run, and changes nothing', async () => {
    const table = 'dry.refresh_tokens';
    await createPartitionedTable(database.current, 'dry', { fromDay: -3, toDay: 3 });
    await insertSpreadRows(database.current, table, { rows: 2_000, pastDays: 3, futureDays: 2 });
    const before = await partitionsOf(database.current, table);
    const rows = await allIds(database.current, { table });
    const { sweeper } = await sweeperFor({ REFRESH_TOKENS_TABLE: table });
    const outcome = finished(await sweeper.sweep('cli', { dryRun: true }));
    const report = outcome.tables[table]!;
    expect(report.partitions!.partitionsToRemove!.map((name) => dayOffset(name))).to.deep.equal([
      -3, -2, -1,
    ]);
    expect(report.partitions!.partitionsToCreate).to.have.length.greaterThan(0);
    expect(report.wouldDelete).to.be.greaterThan(0);
    expect(await partitionsOf(database.current, table)).to.deep.equal(before);
    expect(await allIds(database.current, { table })).to.deep.equal(rows);
  });

  it('gives up on a lock held by a long transaction within lock_timeout, reports it, and never blocks an insert longer', async function () {
    this.timeout(60_000);
    const table = 'locked.refresh_tokens';
    await createPartitionedTable(database.current, 'locked', { fromDay: -3, toDay: 30 });
    await insertSpreadRows(database.current, table, { rows: 2_000, pastDays: 3, futureDays: 20 });
    const lockTimeoutMs = 200;
    const { sweeper, logs } = await sweeperFor({
      REFRESH_TOKENS_TABLE: table,
      PARTITION_LOCK_TIMEOUT_MS: String(lockTimeoutMs),
      PARTITION_LOCK_ATTEMPTS: '2',
    });

    // An auth transaction that reads the table and stays open (it would for 30 s).
    const holder = await database.current.pool.connect();
    await holder.query('BEGIN');
    await holder.query(`SELECT count(*) FROM ${table}`);
    let sweeping = true;
    const insertWaits: number[] = [];
    const inserter = (async () => {
      const client = await database.current.pool.connect();
      try {
        while (sweeping) {
          const started = performance.now();
          await client.query(
            `INSERT INTO ${table} (user_id, token_hash, expires_at)
             VALUES (gen_random_uuid(), md5(random()::text), now() + interval '2 days')`,
          );
          insertWaits.push(performance.now() - started);
        }
      } finally {
        client.release();
      }
    })();
    let outcome: SweepOutcome;
    const started = performance.now();
    try {
      outcome = await sweeper.sweep('schedule');
    } finally {
      sweeping = false;
      await inserter;
      await holder.query('COMMIT');
      holder.release();
    }
    const report = finished(outcome).tables[table]!;
    expect(performance.now() - started, 'the sweep did not wait for the transaction').to.be.below(
      15_000,
    );
    expect(report.partitionsDropped).to.equal(0);
    expect(report.partitions!.partitionsSkipped.map((name) => dayOffset(name))).to.deep.equal([
      -3, -2, -1,
    ]);
    expect(logs.events('sweep.lock_timeout').length).to.be.at.least(6);
    expect(insertWaits.length).to.be.greaterThan(10);
    expect(Math.max(...insertWaits), 'the longest insert, in ms').to.be.below(lockTimeoutMs + 150);

    // Once the transaction is gone, the next sweep drops them.
    const next = finished(await sweeper.sweep('schedule')).tables[table]!;
    expect(next.partitionsDropped).to.equal(3);
  });

  it('sweeps rows that landed in the default partition, and warns about them', async () => {
    const table = 'fallback.refresh_tokens';
    await createPartitionedTable(database.current, 'fallback', {
      fromDay: -2,
      toDay: 2,
      withDefault: true,
    });
    await insertSpreadRows(database.current, table, { rows: 3_000, pastDays: 5, futureDays: 5 });
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const inDefault = await database.query(
      `SELECT count(*)::int AS count FROM fallback.refresh_tokens_default WHERE expires_at < now()`,
    );
    expect(inDefault[0]!.count).to.be.greaterThan(0);
    const { sweeper, logs } = await sweeperFor({ REFRESH_TOKENS_TABLE: table });
    const report = finished(await sweeper.sweep('cli')).tables[table]!;
    expect(await allIds(database.current, { table })).to.deep.equal(live);
    const [warning] = logs.events('sweep.default_partition_rows');
    expect(warning).to.include({ level: 'warn', partition: 'fallback.refresh_tokens_default' });
    expect(warning!.rows).to.equal(report.partitions!.rowsInDefaultPartition).and.be.greaterThan(0);
    // Making a day whose live rows sit in the default partition fails, is reported, and
    // nothing else breaks.
    expect(logs.events('sweep.partition_create_failed')).to.have.length(1);
  });

  it('detaches instead of dropping when configured, keeping the expired days as tables', async () => {
    const table = 'kept.refresh_tokens';
    await createPartitionedTable(database.current, 'kept', { fromDay: -2, toDay: 10 });
    await insertSpreadRows(database.current, table, { rows: 1_000, pastDays: 2, futureDays: 5 });
    const expiredBefore = await database.query(
      `SELECT count(*)::int AS count FROM ${table} WHERE expires_at < now()`,
    );
    const { sweeper } = await sweeperFor({
      REFRESH_TOKENS_TABLE: table,
      EXPIRED_PARTITIONS: 'detach',
    });
    const report = finished(await sweeper.sweep('cli')).tables[table]!;
    expect(report.partitions!.partitionsDetached).to.equal(2);
    expect(report.partitionsDropped).to.equal(0);
    const detached = await database.query(
      `SELECT count(*)::int AS count FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = 'kept' AND c.relname LIKE 'refresh_tokens_p%' AND NOT c.relispartition AND c.relkind = 'r'`,
    );
    expect(detached[0]!.count).to.equal(2);
    const keptRows = await database.query(
      `SELECT (SELECT count(*) FROM kept.refresh_tokens_p${ymd(-1)}) + (SELECT count(*) FROM kept.refresh_tokens_p${ymd(-2)}) AS count`,
    );
    expect(Number(keptRows[0]!.count)).to.be.at.most(expiredBefore[0]!.count).and.greaterThan(0);
  });

  it('purges a revocation promptly in a partition made after the daemon started', async () => {
    const table = 'prompt.refresh_tokens';
    await createPartitionedTable(database.current, 'prompt', { fromDay: 0, toDay: 2 });
    const environment = {
      DATABASE_URL: database.url,
      REFRESH_TOKENS_TABLE: table,
      PASSWORD_RESETS_TABLE: 'none',
    };
    const install = await runCli(['install'], environment);
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    const daemon = spawnDaemon(['start'], environment);
    try {
      await daemon.waitForLog('listener.caught_up');
      // A day the daemon has never seen, as its next sweep or a conversion would make it.
      await database.query(
        `CREATE TABLE prompt.refresh_tokens_later PARTITION OF ${table}
         FOR VALUES FROM (now() + interval '10 days') TO (now() + interval '11 days')`,
      );
      const [token] = await database.query(
        `INSERT INTO ${table} (user_id, token_hash, expires_at)
         VALUES (gen_random_uuid(), md5(random()::text), now() + interval '10 days 1 hour')
         RETURNING id::text`,
      );
      await database.query(`UPDATE ${table} SET revoked = true WHERE id = $1`, [token!.id]);
      const batch = await daemon.waitForLog((line) => line.event === 'purge.batch');
      expect(batch).to.include({ table, deleted: 1 });
      expect(daemon.logs.filter((line) => line.event === 'listener.bad_payload')).to.deep.equal([]);
    } finally {
      daemon.signal('SIGTERM');
      await daemon.exited;
    }
  });

  it('builds install’s indexes on a partitioned table online, one partition at a time', async () => {
    await database.query('CREATE SCHEMA bare');
    await database.query(
      `CREATE TABLE bare.refresh_tokens (id uuid NOT NULL, user_id uuid NOT NULL, token_hash text NOT NULL,
         revoked boolean NOT NULL DEFAULT false, expires_at timestamptz NOT NULL, PRIMARY KEY (id, expires_at))
       PARTITION BY RANGE (expires_at)`,
    );
    await database.query(
      `CREATE TABLE bare.refresh_tokens_a PARTITION OF bare.refresh_tokens FOR VALUES FROM (MINVALUE) TO ('2030-01-01')`,
    );
    await database.query(
      `CREATE TABLE bare.refresh_tokens_b PARTITION OF bare.refresh_tokens DEFAULT`,
    );
    const environment = {
      DATABASE_URL: database.url,
      REFRESH_TOKENS_TABLE: 'bare.refresh_tokens',
      PASSWORD_RESETS_TABLE: 'none',
    };
    const result = await runCli(['install'], environment);
    expect(result.code, result.stderr + result.stdout).to.equal(0);
    const indexes = await database.query(
      `SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
       JOIN pg_namespace n ON n.oid = c.relnamespace
       WHERE n.nspname = 'bare' AND NOT i.indisprimary ORDER BY 1`,
    );
    expect(indexes).to.deep.equal([
      { name: 'refresh_tokens_a_expires_at_idx', valid: true },
      { name: 'refresh_tokens_a_revoked_idx', valid: true },
      { name: 'refresh_tokens_b_expires_at_idx', valid: true },
      { name: 'refresh_tokens_b_revoked_idx', valid: true },
      { name: 'refresh_tokens_expires_at_idx', valid: true },
      { name: 'refresh_tokens_revoked_idx', valid: true },
    ]);
    const again = await runCli(['install'], environment);
    expect(again.code).to.equal(0);
    expect(again.logs.find((line) => line.event === 'install.finished')!.applied).to.deep.equal([]);
  });
});

function ymd(offsetDays: number) {
  return new Date(Math.floor(Date.now() / DAY_MS) * DAY_MS + offsetDays * DAY_MS)
    .toISOString()
    .slice(0, 10)
    .replaceAll('-', '');
}
