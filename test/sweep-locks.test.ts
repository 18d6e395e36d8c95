// Issue 11: a dead row that an auth transaction holds locked is skipped by the sweep, never
// waited on. The sweep finishes, reports the row as skipped, and retries it in the background
// until the lock goes, without another sweep; a lock held past the retry period is left, with
// a warning, to the next sweep.
import { randomBytes } from 'node:crypto';
import { expect } from 'chai';
import type pg from 'pg';
import { loadConfig } from '../src/config.js';
import { createDatabasePool } from '../src/db.js';
import { createReaperEvents } from '../src/events.js';
import { createMetrics, type Metrics } from '../src/metrics.js';
import { createSweeper, type LockedRowsRetry, type Sweeper } from '../src/sweep/sweeper.js';
import { createCapturingLogger, type CapturingLogger } from './support/capture-logger.js';
import { spawnDaemon, waitFor } from './support/cli.js';
import { useTestDatabase, type TestDatabase } from './support/database.js';
import { allIds, createReferenceSchema, insertRandomRows, liveIds } from './support/fixtures.js';
import { finishedSweep } from './support/targets.js';

/** Short enough that a batch waiting on the lock would fail the sweep within the test. */
const STATEMENT_TIMEOUT_MS = '2000';
const LOCK_MODES = ['FOR KEY SHARE', 'FOR UPDATE'] as const;
type LockMode = (typeof LOCK_MODES)[number];

interface HeldRows {
  ids: string[];
  release(): Promise<void>;
}

/**
 * Another connection's open transaction locks `count` dead rows in the middle of the heap,
 * one every few pages, as an auth transaction does (FOR KEY SHARE is the lock of a
 * foreign-key check).
 */
async function holdDeadRows(
  database: TestDatabase,
  table: string,
  mode: LockMode,
  release: (() => Promise<void>)[],
  count = 1,
): Promise<HeldRows> {
  const client: pg.PoolClient = await database.pool.connect();
  await client.query('BEGIN');
  const locked = await client.query<{ id: string }>(
    `SELECT id::text AS id FROM ${table}
     WHERE ctid IN (SELECT DISTINCT ON ((ctid::text::point)[0]) ctid FROM ${table}
                    WHERE ctid >= '(20,0)' AND (revoked OR expires_at < now())
                      AND (ctid::text::point)[0]::int % 3 = 0
                    ORDER BY (ctid::text::point)[0], ctid LIMIT ${count})
     ${mode}`,
  );
  expect(locked.rows).to.have.length(count);
  let held = true;
  const end = async () => {
    if (!held) return;
    held = false;
    await client.query('COMMIT');
    client.release();
  };
  release.push(end);
  return { ids: locked.rows.map((row) => row.id), release: end };
}

describe('the sweep and rows locked by other transactions', () => {
  const database = useTestDatabase('sweep_locks');
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    while (cleanup.length > 0) await cleanup.pop()!();
  });

  /** A reference refresh-tokens table alone in `schema`, about 100 pages of random rows. */
  async function tokenTable(schema: string) {
    await createReferenceSchema(database.current, { schema, passwordResetsTable: null });
    const table = `${schema}.refresh_tokens`;
    await insertRandomRows(database.current, {
      table,
      kind: 'refresh_tokens',
      count: 5_000,
      seed: Math.random(),
    });
    return table;
  }

  /**
   * A sweep leaves exactly the held rows (and reports `expected` for the table); once they
   * are released, its retry deletes them, and exactly the live rows remain.
   */
  async function sweepsAroundThenRetries(
    {
      sweeper,
      logs,
      metrics,
      table,
      live,
      held,
    }: {
      sweeper: Sweeper;
      logs: CapturingLogger;
      metrics: Metrics;
      table: string;
      live: Set<string>;
      held: { ids: string[]; release(): Promise<void> };
    },
    expected: Record<string, number>,
  ) {
    const outcome = finishedSweep(await sweeper.sweep('cli'));
    expect(outcome.tables[table]).to.include(expected);
    expect(await allIds(database.current, { table })).to.deep.equal(
      new Set([...live, ...held.ids]),
    );
    await held.release();
    await sweeper.retrySettled();
    expect(logs.events('sweep.retry').at(-1)).to.include({ skipped: 0 });
    expect(await allIds(database.current, { table })).to.deep.equal(live);
    // The rows the retry deleted count as the sweep's, like every other.
    const counted = (
      await metrics.registry.getSingleMetric('token_reaper_rows_deleted_total')!.get()
    ).values
      .filter((sample) => sample.labels['path'] === 'sweep')
      .reduce((sum, sample) => sum + sample.value, 0);
    expect(counted).to.equal(outcome.deleted + held.ids.length);
  }

  async function sweeperFor(
    table: string,
    environment: Record<string, string> = {},
    lockedRowsRetry?: LockedRowsRetry,
  ) {
    const config = loadConfig({
      DATABASE_URL: database.url,
      NODE_ENV: 'test',
      REFRESH_TOKENS_TABLE: table,
      PASSWORD_RESETS_TABLE: 'none',
      STATEMENT_TIMEOUT_MS,
      SWEEP_BATCH_PAGES: '10',
      ...environment,
    });
    const logs = createCapturingLogger('debug');
    const pool = await createDatabasePool(config, logs.logger, {
      maximumPoolSize: config.sweep.concurrency + 1,
    });
    const events = createReaperEvents();
    const metrics = createMetrics(events, {
      readiness: () => ({ ready: true, reasons: [], problems: [] }),
      defaultMetrics: false,
    });
    const sweeper = createSweeper({
      pool,
      config,
      logger: logs.logger,
      events,
      ...(lockedRowsRetry ? { lockedRowsRetry } : {}),
    });
    cleanup.push(async () => {
      metrics.close();
      await sweeper.stop();
      await pool.end();
    });
    return { sweeper, logs, metrics };
  }

  for (const mode of LOCK_MODES) {
    it(`skips a dead row held ${mode}, deletes every other one, and deletes it once the lock goes`, async () => {
      const table = await tokenTable(`locked_${mode.replace(/ /g, '_').toLowerCase()}`);
      const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
      const before = await allIds(database.current, { table });
      const held = await holdDeadRows(database.current, table, mode, cleanup);
      const { sweeper, logs } = await sweeperFor(
        table,
        // Two workers for one of the modes: the skip is per batch, whichever worker runs it.
        mode === 'FOR UPDATE' ? { SWEEP_CONCURRENCY: '2' } : {},
      );

      const outcome = finishedSweep(await sweeper.sweep('cli'));
      expect(outcome.interrupted).to.equal(false);
      expect(outcome.skipped).to.equal(1);
      expect(outcome.tables[table]).to.include({
        skipped: 1,
        deleted: before.size - live.size - 1,
      });
      expect(logs.events('sweep.finished')[0]).to.include({ skipped: 1 });
      expect(await allIds(database.current, { table })).to.deep.equal(
        new Set([...live, ...held.ids]),
      );

      // While the lock is held, the retry finds the row still locked and keeps it.
      await waitFor(() => logs.events('sweep.retry').length > 0, {
        message: 'the first retry of the locked row',
      });
      expect(logs.events('sweep.retry')[0]).to.include({ attempt: 1, deleted: 0, skipped: 1 });
      expect((await allIds(database.current, { table })).has(held.ids[0]!)).to.equal(true);

      await held.release();
      const done = await waitFor(
        () => logs.events('sweep.retry').find((line) => line.skipped === 0),
        { message: 'the retry that deletes the row once its lock is gone' },
      );
      expect(done).to.include({ deleted: 1 });
      await sweeper.retrySettled();
      expect(await allIds(database.current, { table })).to.deep.equal(live);
      expect(logs.events('sweep.started'), 'sweeps started').to.have.length(1);
    });
  }

  it('skips exactly the locked rows when several share one batch, and retries them all', async () => {
    const table = await tokenTable('locked_several');
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const held = await holdDeadRows(database.current, table, 'FOR KEY SHARE', cleanup, 5);
    // One batch for the whole table, so that all five are found in the same one.
    const { sweeper, logs, metrics } = await sweeperFor(table, { SWEEP_BATCH_PAGES: '1000' });

    await sweepsAroundThenRetries(
      { sweeper, logs, metrics, table, live, held },
      { batches: 1, skipped: 5 },
    );
  });

  it('skips locked rows in the partitions of a partitioned table, and retries them there', async () => {
    const schema = 'locked_partitions';
    const table = `${schema}.refresh_tokens`;
    await database.query(`CREATE SCHEMA ${schema}`);
    await database.query(
      `CREATE TABLE ${table} (id uuid PRIMARY KEY, user_id uuid NOT NULL, token_hash text NOT NULL,
         revoked boolean NOT NULL DEFAULT false, expires_at timestamptz NOT NULL,
         created_at timestamptz NOT NULL DEFAULT now()) PARTITION BY HASH (id)`,
    );
    for (const remainder of [0, 1]) {
      await database.query(
        `CREATE TABLE ${table}_${remainder} PARTITION OF ${table}
           FOR VALUES WITH (MODULUS 2, REMAINDER ${remainder})`,
      );
    }
    await insertRandomRows(database.current, {
      table,
      kind: 'refresh_tokens',
      count: 10_000,
      seed: Math.random(),
    });
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const held = await holdDeadRows(database.current, `${table}_1`, 'FOR KEY SHARE', cleanup);
    const { sweeper, logs, metrics } = await sweeperFor(table);

    await sweepsAroundThenRetries({ sweeper, logs, metrics, table, live, held }, { skipped: 1 });
  });

  it('skips a locked row as a role that may only read and delete, as install --role makes it', async () => {
    // SELECT … FOR UPDATE SKIP LOCKED would need UPDATE on the table: the sweep must not.
    const schema = 'locked_role';
    const table = await tokenTable(schema);
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const role = `token_reaper_test_locks_${randomBytes(4).toString('hex')}`;
    const password = randomBytes(12).toString('hex');
    await database.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}'`);
    cleanup.push(async () => {
      await database.query(`DROP OWNED BY ${role}`);
      await database.query(`DROP ROLE ${role}`);
    });
    await database.query(`GRANT USAGE ON SCHEMA ${schema} TO ${role}`);
    await database.query(`GRANT SELECT, DELETE ON ${table} TO ${role}`);
    const url = new URL(database.url);
    url.username = role;
    url.password = password;
    const held = await holdDeadRows(database.current, table, 'FOR KEY SHARE', cleanup);
    const { sweeper } = await sweeperFor(table, { DATABASE_URL: url.toString() });

    expect(finishedSweep(await sweeper.sweep('cli'))).to.include({ skipped: 1 });
    await held.release();
    await sweeper.retrySettled();
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });

  it('counts a locked row in a dry run without waiting on it, and retries nothing', async () => {
    const table = await tokenTable('locked_dry_run');
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const before = await allIds(database.current, { table });
    await holdDeadRows(database.current, table, 'FOR UPDATE', cleanup);
    const { sweeper, logs } = await sweeperFor(table);

    const outcome = finishedSweep(await sweeper.sweep('cli', { dryRun: true }));
    expect(outcome.tables[table]).to.include({
      wouldDelete: before.size - live.size,
      skipped: 0,
    });
    await sweeper.retrySettled();
    expect(logs.events('sweep.retry')).to.deep.equal([]);
    expect(await allIds(database.current, { table })).to.deep.equal(before);
  });

  it('gives up after the retry period with a warning, and leaves the row to the next sweep', async () => {
    const table = await tokenTable('locked_give_up');
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const held = await holdDeadRows(database.current, table, 'FOR KEY SHARE', cleanup);
    const { sweeper, logs } = await sweeperFor(
      table,
      {},
      { firstDelayMs: 20, maxDelayMs: 100, periodMs: 600 },
    );

    finishedSweep(await sweeper.sweep('schedule'));
    await sweeper.retrySettled();
    const [gaveUp] = logs.events('sweep.retry_gave_up');
    expect(gaveUp).to.include({ level: 'warn', skipped: 1, retryPeriodMs: 600 });
    expect(gaveUp!.tables).to.deep.equal({ [table]: 1 });
    expect(logs.events('sweep.retry').length).to.be.at.least(2);
    expect((await allIds(database.current, { table })).has(held.ids[0]!)).to.equal(true);

    await held.release();
    const next = finishedSweep(await sweeper.sweep('schedule'));
    expect(next).to.include({ deleted: 1, skipped: 0 });
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });

  it('stops retrying when the sweeper stops, and when a new sweep starts', async () => {
    const table = await tokenTable('locked_stop');
    await holdDeadRows(database.current, table, 'FOR UPDATE', cleanup);
    const { sweeper, logs } = await sweeperFor(table);

    finishedSweep(await sweeper.sweep('signal'));
    const second = finishedSweep(await sweeper.sweep('signal'));
    expect(second.skipped).to.equal(1);
    expect(logs.events('sweep.retry_stopped')[0]).to.include({
      reason: 'a new sweep started',
      skipped: 1,
    });

    await sweeper.stop();
    await sweeper.retrySettled();
    expect(logs.events('sweep.retry_stopped')[1]).to.include({
      reason: 'token-reaper is stopping',
      skipped: 1,
    });
  });

  it('token-reaper sweep reports the locked row, waits for its retry, and exits 0', async () => {
    const table = await tokenTable('locked_cli');
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const held = await holdDeadRows(database.current, table, 'FOR KEY SHARE', cleanup);
    const child = spawnDaemon(['sweep'], {
      DATABASE_URL: database.url,
      REFRESH_TOKENS_TABLE: table,
      PASSWORD_RESETS_TABLE: 'none',
      STATEMENT_TIMEOUT_MS,
      SWEEP_BATCH_PAGES: '10',
    });
    const finished = await child.waitForLog('sweep.finished');
    expect(finished).to.include({ skipped: 1 });
    expect((finished.tables as Record<string, { skipped: number }>)[table]).to.include({
      skipped: 1,
    });
    await child.waitForLog('sweep.retry');
    await held.release();
    const done = await child.waitForLog(
      (line) => line.event === 'sweep.retry' && line.skipped === 0,
    );
    expect(done).to.include({ deleted: 1 });
    expect(await child.exited, child.describeOutput()).to.deep.equal({ code: 0, signal: null });
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });
});
