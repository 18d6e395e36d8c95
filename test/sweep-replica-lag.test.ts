// SWEEP_MAX_REPLICA_LAG on a real primary with a real streaming standby (pg_basebackup -R on
// a throwaway cluster): a standby whose replay is paused holds the sweep, and its resume lets
// the sweep finish.
import { expect } from 'chai';
import pg from 'pg';
import type { SweepProgressEvent, SweepThrottleEvent } from '../src/events.js';
import { createMetrics } from '../src/metrics.js';
import { waitFor } from './support/cli.js';
import { createCluster, type Cluster } from './support/cluster.js';
import { databaseUrl, useTestDatabase } from './support/database.js';
import { allIds, liveIds } from './support/fixtures.js';
import {
  installSweepPositions,
  referenceTokenTable,
  slowDeletes,
  sweeperFor,
} from './support/sweeper.js';
import { finishedSweep } from './support/targets.js';

async function onServer<T>(url: string, work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

describe('SWEEP_MAX_REPLICA_LAG', function () {
  let primary: Cluster | null = null;
  let standby: Cluster | null = null;
  const cleanup: (() => Promise<void>)[] = [];

  before(async function () {
    primary = await createCluster();
    if (primary === null) {
      console.error('skipped: no PostgreSQL server binaries under /usr/lib/postgresql');
      this.skip();
    }
    // A status report every second, so the primary learns soon that replay went on.
    standby = await primary.replica(['wal_receiver_status_interval=1']);
  });
  // Declared between the two: its database is made after the cluster, and dropped before it.
  const database = useTestDatabase('sweep_replica_lag', { server: () => primary!.url });
  after(async () => {
    await standby?.dispose();
    await primary?.dispose();
  });
  afterEach(async () => {
    while (cleanup.length > 0) await cleanup.pop()!();
  });

  /** 8,000 rows whose every deleted row costs 1 ms: a walk of a few seconds. */
  async function slowTable(schema: string) {
    const table = await referenceTokenTable(database.current, schema, 8_000, 0.7);
    await slowDeletes(database.current, table, 0.001, 'ROW');
    return table;
  }

  const settings = (table: string) => ({
    REFRESH_TOKENS_TABLE: table,
    PASSWORD_RESETS_TABLE: 'none',
    SWEEP_BATCH_PAGES: '1',
    SWEEP_BATCH_TARGET_MS: '5',
    SWEEP_PAUSE_RATIO: '0',
    SWEEP_MAX_REPLICA_LAG: '1s',
  });

  const rowCount = async (table: string) =>
    Number((await database.current.query(`SELECT count(*) AS n FROM ${table}`))[0]!.n);

  it('pauses a running sweep while the standby’s replay is paused, with no deletes, and finishes once replay resumes', async () => {
    const table = await slowTable('lag_paused');
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    // The standby has the table before its replay stops.
    await waitFor(
      () =>
        onServer(primary!.url, async (client) => {
          const { rows } = await client.query<{ caughtUp: boolean }>(`
            SELECT bool_and(replay_lsn >= pg_current_wal_lsn()) AS "caughtUp"
            FROM pg_stat_replication`);
          return rows[0]?.caughtUp === true;
        }),
      { timeoutMs: 30_000, message: 'the standby to catch up' },
    );
    await onServer(standby!.url, (client) => client.query('SELECT pg_wal_replay_pause()'));

    // Two workers: neither may go on while the standby is behind.
    const { sweeper, logs, events } = await sweeperFor(
      database.current,
      { ...settings(table), SWEEP_CONCURRENCY: '2' },
      cleanup,
    );
    const metrics = createMetrics(events, {
      readiness: () => ({ ready: true, reasons: [], problems: [] }),
      defaultMetrics: false,
    });
    cleanup.push(async () => metrics.close());
    const gauge = async () =>
      (await metrics.registry.getSingleMetricAsString('token_reaper_sweep_throttled')).trim();
    const progress: SweepProgressEvent[] = [];
    const throttles: SweepThrottleEvent[] = [];
    events.on('progress', (event) => progress.push(event));
    events.on('sweepThrottle', (event) => throttles.push(event));
    const running = sweeper.sweep('cli');

    const throttled = await waitFor(() => logs.events('sweep.throttled')[0], {
      timeoutMs: 30_000,
      message: 'sweep.throttled',
    });
    expect(throttled.level).to.equal('warn');
    expect(throttled.source).to.match(/^standby /);
    expect(throttled.lagMs).to.be.above(1_000);
    expect(throttled.lagBytes).to.be.above(0);
    // A batch the other worker had in flight finishes within the second of one progress event
    // that reports the pause; then nothing more is deleted for the two seconds of two more.
    const pausedSince = progress.length;
    await waitFor(
      () => progress.slice(pausedSince).filter((event) => event.throttled).length >= 2,
      {
        timeoutMs: 10_000,
        message: 'progress events during the pause',
      },
    );
    const batches = logs.events('sweep.batch').length;
    const rows = await rowCount(table);
    expect(batches).to.be.above(0);
    const seen = progress.length;
    await waitFor(
      () => progress.slice(seen).filter((event) => event.throttled !== null).length >= 2,
      { timeoutMs: 10_000, message: 'two progress events during the pause' },
    );
    expect(progress.at(-1)!.throttled).to.include({ source: throttled.source });
    expect(logs.events('sweep.batch').length).to.equal(batches);
    expect(await rowCount(table)).to.equal(rows);
    expect(logs.events('sweep.throttled')).to.have.length(1);
    expect(throttles).to.deep.include({ ...throttles[0]!, throttled: true });
    expect(await gauge()).to.match(/\ntoken_reaper_sweep_throttled 1$/);

    await onServer(standby!.url, (client) => client.query('SELECT pg_wal_replay_resume()'));
    const outcome = finishedSweep(await running);
    expect(outcome).to.include({ partial: false, interrupted: false });
    expect(logs.events('sweep.unthrottled')).to.have.length.at.least(1);
    expect(logs.events('sweep.batch').length).to.be.above(batches);
    expect(throttles.at(-1)).to.include({ throttled: false });
    expect(await gauge()).to.match(/\ntoken_reaper_sweep_throttled 0$/);
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });

  it('ends the sweep as partial when a pause lasts too long, and the next sweep resumes', async () => {
    await installSweepPositions(database.current);
    const table = await slowTable('lag_gave_up');
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    await onServer(standby!.url, (client) => client.query('SELECT pg_wal_replay_pause()'));
    try {
      const { sweeper, logs } = await sweeperFor(database.current, settings(table), cleanup, {
        maxReplicaPauseMs: 1_500,
      });
      const outcome = finishedSweep(await sweeper.sweep('schedule'));
      expect(outcome).to.include({ partial: true, interrupted: false, endedBy: 'replica_lag' });
      const gaveUp = logs.events('sweep.throttle_gave_up');
      expect(gaveUp).to.have.length(1);
      expect(gaveUp[0]!).to.include({ level: 'warn' });
      expect(gaveUp[0]!.pausedMs).to.be.above(1_500);
      expect(logs.events('sweep.finished')[0]!.message).to.match(/replica that stayed behind/);
    } finally {
      await onServer(standby!.url, (client) => client.query('SELECT pg_wal_replay_resume()'));
    }
    const next = await sweeperFor(
      database.current,
      { ...settings(table), SWEEP_MAX_REPLICA_LAG: '1 hour' },
      cleanup,
    );
    const rest = finishedSweep(await next.sweeper.sweep('schedule'));
    expect(rest.tables[table]!.resumedFromPage).to.be.above(0);
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });

  it('warns once and sweeps without waiting when the role cannot read the standbys', async () => {
    const table = await slowTable('lag_unreadable');
    await database.current.query(`
      CREATE ROLE lag_reader LOGIN;
      GRANT USAGE ON SCHEMA lag_unreadable TO lag_reader;
      GRANT SELECT, DELETE ON ${table} TO lag_reader;
    `);
    cleanup.push(async () => {
      await database.current.query('DROP OWNED BY lag_reader; DROP ROLE lag_reader');
    });
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const url = new URL(databaseUrl(database.current.name, primary!.url));
    url.username = 'lag_reader';
    const { sweeper, logs } = await sweeperFor(
      { url: url.toString() },
      { ...settings(table), SWEEP_BATCH_PAGES: '64', SWEEP_BATCH_TARGET_MS: '100' },
      cleanup,
    );
    finishedSweep(await sweeper.sweep('cli'));
    finishedSweep(await sweeper.sweep('cli'));
    const warnings = logs.events('sweep.replica_lag_unreadable');
    expect(warnings).to.have.length(1);
    expect(warnings[0]!.message).to.match(/pg_read_all_stats/);
    expect(logs.events('sweep.throttled')).to.deep.equal([]);
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });
});
