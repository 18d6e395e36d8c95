// The sweep on a real PostgreSQL: it deletes exactly the dead rows, in both column shapes,
// with writers running beside it, and it never runs twice at once.
import { expect } from 'chai';
import type pg from 'pg';
import type { SweepProgressEvent } from '../src/events.js';
import { SWEEP_LOCK, type SweepOutcome } from '../src/sweep/sweeper.js';
import { referenceTokenTable, sweeperFor } from './support/sweeper.js';
import { finishedSweep } from './support/targets.js';
import { useTestDatabase, type TestDatabase } from './support/database.js';
import { allIds, createReferenceSchema, insertRandomRows, liveIds } from './support/fixtures.js';
import { waitFor } from './support/cli.js';

const finished = finishedSweep;

async function ids(database: TestDatabase, table: string): Promise<Set<string>> {
  const rows = await database.query(`SELECT id::text AS id FROM ${table}`);
  return new Set(rows.map((row) => row.id as string));
}

describe('the sweep', () => {
  const database = useTestDatabase('sweep');
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    while (cleanup.length > 0) await cleanup.pop()!();
  });

  const tokenTable = (schema: string, count: number) =>
    referenceTokenTable(database.current, schema, count);

  for (const shape of ['boolean', 'timestamp'] as const) {
    it(`deletes exactly the dead rows of random data in the ${shape} shape, and no live one`, async () => {
      const schema = `sweep_${shape}`;
      await createReferenceSchema(database.current, {
        schema,
        revokedShape: shape,
        usedShape: shape,
      });
      const seed = Math.random();
      for (const table of ['refresh_tokens', 'password_resets'] as const) {
        await insertRandomRows(database.current, {
          table: `${schema}.${table}`,
          kind: table,
          shape,
          count: 20_000,
          seed,
        });
      }
      const liveTokens = await liveIds(database.current, {
        table: `${schema}.refresh_tokens`,
        kind: 'refresh_tokens',
        shape,
      });
      const liveResets = await liveIds(database.current, {
        table: `${schema}.password_resets`,
        kind: 'password_resets',
        shape,
      });
      const tokensBefore = await ids(database.current, `${schema}.refresh_tokens`);
      expect(liveTokens.size, `seed ${seed}`).to.be.within(1, tokensBefore.size - 1);

      const { sweeper } = await sweeperFor(
        database.current,
        {
          REFRESH_TOKENS_TABLE: `${schema}.refresh_tokens`,
          PASSWORD_RESETS_TABLE: `${schema}.password_resets`,
          // Small batches and two workers, so the walk crosses many batch boundaries.
          SWEEP_BATCH_PAGES: '7',
          SWEEP_CONCURRENCY: '2',
        },
        cleanup,
      );
      const outcome = finished(await sweeper.sweep('cli'));

      expect(await ids(database.current, `${schema}.refresh_tokens`), `seed ${seed}`).to.deep.equal(
        new Set(liveTokens),
      );
      expect(
        await ids(database.current, `${schema}.password_resets`),
        `seed ${seed}`,
      ).to.deep.equal(new Set(liveResets));
      const tokens = outcome.tables[`${schema}.refresh_tokens`]!;
      expect(tokens.deleted).to.equal(tokensBefore.size - liveTokens.size);
      expect(tokens.batches).to.be.greaterThan(2);
      expect(outcome.deleted).to.equal(
        tokens.deleted + outcome.tables[`${schema}.password_resets`]!.deleted,
      );
    });
  }

  it('keeps every live row while writers insert and revoke during the sweep', async () => {
    const table = await tokenTable('sweep_concurrent', 60_000);
    const deadBefore = await database.current.query(
      `SELECT id::text AS id FROM ${table} WHERE revoked OR expires_at < now()`,
    );
    const liveBefore = await liveIds(database.current, {
      table,
      kind: 'refresh_tokens',
      shape: 'boolean',
    });

    const { sweeper } = await sweeperFor(
      database.current,
      { REFRESH_TOKENS_TABLE: table, PASSWORD_RESETS_TABLE: 'none', SWEEP_BATCH_PAGES: '2' },
      cleanup,
    );
    const inserted = new Set<string>();
    const revoked = new Set<string>();
    let sweeping = true;
    const writer = async (client: pg.PoolClient) => {
      while (sweeping) {
        const insert = await client.query<{ id: string }>(
          `INSERT INTO ${table} (id, user_id, token_hash, expires_at)
           SELECT gen_random_uuid(), gen_random_uuid(), md5(random()::text || clock_timestamp()), now() + interval '1 day'
           FROM generate_series(1, 20) RETURNING id::text`,
        );
        for (const row of insert.rows) inserted.add(row.id);
        const revoke = await client.query<{ id: string }>(
          `UPDATE ${table} SET revoked = true
           WHERE id = (SELECT id FROM ${table} WHERE NOT revoked AND expires_at > now() + interval '1 minute'
                       ORDER BY random() LIMIT 1) RETURNING id::text`,
        );
        for (const row of revoke.rows) revoked.add(row.id);
      }
    };
    const clients = await Promise.all([
      database.current.pool.connect(),
      database.current.pool.connect(),
    ]);
    const writers = clients.map((client) => writer(client));
    const outcome = finished(await sweeper.sweep('cli'));
    sweeping = false;
    await Promise.all(writers);
    clients.forEach((client) => client.release());

    expect(inserted.size).to.be.greaterThan(0);
    expect(revoked.size).to.be.greaterThan(0);
    const remaining = await ids(database.current, table);
    const mustRemain = [...liveBefore, ...inserted].filter((id) => !revoked.has(id));
    const lost = mustRemain.filter((id) => !remaining.has(id));
    expect(lost, 'live rows deleted by the sweep').to.deep.equal([]);
    const survivors = deadBefore.map((row) => row.id as string).filter((id) => remaining.has(id));
    expect(survivors, 'dead rows the sweep left').to.deep.equal([]);
    expect(outcome.tables[table]!.deleted).to.be.at.least(deadBefore.length);
  });

  it('counts exactly the dead rows in a dry run and deletes nothing', async () => {
    const schema = 'sweep_dry_run';
    await createReferenceSchema(database.current, { schema });
    for (const table of ['refresh_tokens', 'password_resets'] as const) {
      await insertRandomRows(database.current, {
        table: `${schema}.${table}`,
        kind: table,
        shape: 'boolean',
        count: 5_000,
        seed: Math.random(),
      });
    }
    const before = await ids(database.current, `${schema}.refresh_tokens`);
    const live = await liveIds(database.current, {
      table: `${schema}.refresh_tokens`,
      kind: 'refresh_tokens',
      shape: 'boolean',
    });
    const { sweeper, logs } = await sweeperFor(
      database.current,
      {
        REFRESH_TOKENS_TABLE: `${schema}.refresh_tokens`,
        PASSWORD_RESETS_TABLE: `${schema}.password_resets`,
      },
      cleanup,
    );
    const outcome = finished(await sweeper.sweep('cli', { dryRun: true }));
    expect(outcome.dryRun).to.equal(true);
    expect(outcome.deleted).to.equal(0);
    expect(outcome.tables[`${schema}.refresh_tokens`]!.wouldDelete).to.equal(
      before.size - live.size,
    );
    expect(await ids(database.current, `${schema}.refresh_tokens`)).to.deep.equal(before);
    const [line] = logs.events('sweep.finished');
    expect(line).to.include({ dryRun: true, deleted: 0 });
  });

  it('joins a sweep already running instead of starting a second one', async () => {
    const schema = 'sweep_join';
    await createReferenceSchema(database.current, { schema, passwordResetsTable: null });
    await insertRandomRows(database.current, {
      table: `${schema}.refresh_tokens`,
      kind: 'refresh_tokens',
      shape: 'boolean',
      count: 2_000,
      seed: 0.5,
    });
    const { sweeper, logs } = await sweeperFor(
      database.current,
      { REFRESH_TOKENS_TABLE: `${schema}.refresh_tokens`, PASSWORD_RESETS_TABLE: 'none' },
      cleanup,
    );
    const first = sweeper.sweep('schedule');
    const second = sweeper.sweep('signal');
    const [firstOutcome, secondOutcome] = await Promise.all([first, second]);
    expect(secondOutcome).to.equal(firstOutcome);
    expect(logs.events('sweep.started')).to.have.length(1);
    expect(logs.events('sweep.joined')[0]).to.include({
      trigger: 'signal',
      runningTrigger: 'schedule',
    });
    // Once it is over, the next request runs a sweep of its own.
    finished(await sweeper.sweep('signal'));
    expect(logs.events('sweep.started')).to.have.length(2);
  });

  it('skips when another process holds the sweep lock', async () => {
    const schema = 'sweep_locked';
    await createReferenceSchema(database.current, { schema, passwordResetsTable: null });
    const { sweeper, logs } = await sweeperFor(
      database.current,
      { REFRESH_TOKENS_TABLE: `${schema}.refresh_tokens`, PASSWORD_RESETS_TABLE: 'none' },
      cleanup,
    );
    const holder = await database.current.pool.connect();
    try {
      await holder.query('SELECT pg_advisory_lock($1, $2)', [
        SWEEP_LOCK.classId,
        SWEEP_LOCK.objectId,
      ]);
      const outcome = await sweeper.sweep('schedule');
      expect(outcome.status).to.equal('skipped');
      expect(logs.events('sweep.skipped')[0]).to.include({ trigger: 'schedule' });
      expect(logs.events('sweep.skipped')[0]!.reason).to.match(/another token-reaper/);
      await holder.query('SELECT pg_advisory_unlock($1, $2)', [
        SWEEP_LOCK.classId,
        SWEEP_LOCK.objectId,
      ]);
      finished(await sweeper.sweep('schedule'));
    } finally {
      holder.release();
    }
  });

  it('stops between batches when asked, leaving no live row deleted', async () => {
    const table = await tokenTable('sweep_stop', 50_000);
    const live = await liveIds(database.current, {
      table,
      kind: 'refresh_tokens',
      shape: 'boolean',
    });
    const { sweeper, logs } = await sweeperFor(
      database.current,
      { REFRESH_TOKENS_TABLE: table, PASSWORD_RESETS_TABLE: 'none', SWEEP_BATCH_PAGES: '1' },
      cleanup,
    );
    const running = sweeper.sweep('signal');
    await waitFor(async () => logs.events('sweep.batch').length > 0, {
      timeoutMs: 10_000,
      message: 'the first batch',
    });
    await sweeper.stop();
    const outcome = finished(await running);
    expect(outcome.interrupted).to.equal(true);
    const remaining = await ids(database.current, table);
    expect([...live].filter((id) => !remaining.has(id))).to.deep.equal([]);
    const pages = await database.current.query(
      `SELECT pg_relation_size('${table}') / current_setting('block_size')::int AS pages`,
    );
    expect(logs.events('sweep.batch').length).to.be.below(Number(pages[0]!.pages));
    expect((await sweeper.sweep('signal')).status).to.equal('skipped');
  });

  it('sweeps each partition of a partitioned table until partition maintenance takes over', async () => {
    await database.query('CREATE SCHEMA sweep_parted');
    await database.query(
      `CREATE TABLE sweep_parted.refresh_tokens (id uuid NOT NULL DEFAULT gen_random_uuid(),
         user_id uuid NOT NULL, token_hash text NOT NULL, revoked boolean NOT NULL DEFAULT false,
         expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now())
       PARTITION BY RANGE (expires_at)`,
    );
    await database.query(
      `CREATE TABLE sweep_parted.refresh_tokens_past PARTITION OF sweep_parted.refresh_tokens
         FOR VALUES FROM (MINVALUE) TO ('2000-01-01')`,
    );
    await database.query(
      `CREATE TABLE sweep_parted.refresh_tokens_rest PARTITION OF sweep_parted.refresh_tokens DEFAULT`,
    );
    const table = 'sweep_parted.refresh_tokens';
    await insertRandomRows(database.current, {
      table,
      kind: 'refresh_tokens',
      count: 5_000,
      seed: Math.random(),
    });
    await database.query(
      `INSERT INTO ${table} (user_id, token_hash, expires_at)
       SELECT gen_random_uuid(), md5(random()::text), '1999-01-01' FROM generate_series(1, 100)`,
    );
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const { sweeper } = await sweeperFor(
      database.current,
      { REFRESH_TOKENS_TABLE: table, PASSWORD_RESETS_TABLE: 'none', SWEEP_BATCH_PAGES: '5' },
      cleanup,
    );
    finished(await sweeper.sweep('cli'));
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });

  it('reports progress while a long sweep runs: events every second, a log line every 5 s', async function () {
    this.timeout(30_000);
    const schema = 'sweep_progress';
    await createReferenceSchema(database.current, { schema, passwordResetsTable: null });
    const table = `${schema}.refresh_tokens`;
    await insertRandomRows(database.current, {
      table,
      kind: 'refresh_tokens',
      count: 20_000,
      seed: 0.3,
    });
    const { sweeper, logs, events } = await sweeperFor(
      database.current,
      // No pause: the held batch lasts seconds, and a pause in proportion would outlast the test.
      {
        REFRESH_TOKENS_TABLE: table,
        PASSWORD_RESETS_TABLE: 'none',
        SWEEP_BATCH_PAGES: '10',
        SWEEP_PAUSE_RATIO: '0',
      },
      cleanup,
    );
    const progress: SweepProgressEvent[] = [];
    events.on('progress', (event) => progress.push(event));
    // A dead row in the middle of the table whose delete waits for an advisory lock holds the
    // sweep there, in flight, for as long as the test needs. (A lock wait would not: the sweep
    // gives up on a lock after a moment, skips the row, and retries it after it has finished.
    // So the trigger polls.)
    const [middle] = await database.current.query(
      `SELECT id::text AS id FROM ${table} WHERE ctid >= '(100,0)' AND revoked ORDER BY ctid LIMIT 1`,
    );
    const holder = await database.current.pool.connect();
    await holder.query('SELECT pg_advisory_lock(7001)');
    await holder.query(`CREATE FUNCTION ${schema}.hold() RETURNS trigger LANGUAGE plpgsql
      AS $$ BEGIN
        WHILE NOT pg_try_advisory_xact_lock_shared(7001) LOOP PERFORM pg_sleep(0.01); END LOOP;
        RETURN OLD;
      END $$`);
    await holder.query(`CREATE TRIGGER hold BEFORE DELETE ON ${table} FOR EACH ROW
      WHEN (OLD.id = '${middle!.id as string}') EXECUTE FUNCTION ${schema}.hold()`);
    let outcome: Promise<SweepOutcome> | undefined;
    try {
      outcome = sweeper.sweep('cli');
      await waitFor(() => logs.events('sweep.progress').length > 0, {
        timeoutMs: 15_000,
        message: 'a sweep.progress line',
      });
    } finally {
      await holder.query('SELECT pg_advisory_unlock(7001)');
      holder.release();
    }
    finished(await outcome!);
    expect(progress.length).to.be.at.least(4);
    const last = progress.at(-1)!;
    expect(last).to.include({ table });
    expect(last.pagesDone).to.be.greaterThan(0).and.below(last.pagesTotal);
    expect(last.deleted).to.be.greaterThan(0);
    const [line] = logs.events('sweep.progress');
    expect(line).to.include.keys(
      'pagesDone',
      'pagesTotal',
      'deleted',
      'rowsPerSecond',
      'etaSeconds',
    );
  });

  it('fails cleanly when the table is gone, and succeeds once it is back', async () => {
    const schema = 'sweep_dropped';
    await createReferenceSchema(database.current, { schema, passwordResetsTable: null });
    const { sweeper, logs } = await sweeperFor(
      database.current,
      { REFRESH_TOKENS_TABLE: `${schema}.refresh_tokens`, PASSWORD_RESETS_TABLE: 'none' },
      cleanup,
    );
    finished(await sweeper.sweep('schedule'));
    await database.current.query(`DROP TABLE ${schema}.refresh_tokens`);
    const failed = await sweeper.sweep('schedule');
    expect(failed.status).to.equal('failed');
    const [line] = logs.events('sweep.failed');
    expect(line).to.include({ level: 'error', trigger: 'schedule' });
    expect((line!.error as { message: string }).message).to.include(
      `${schema}.refresh_tokens does not exist`,
    );
    expect(line!.durationMs).to.be.a('number');

    await createReferenceSchema(database.current, { schema, passwordResetsTable: null });
    finished(await sweeper.sweep('schedule'));
  });
});
