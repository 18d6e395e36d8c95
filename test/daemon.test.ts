// `token-reaper start` as a real child process: its schedule, its signals, and its behaviour
// when a sweep fails. Overlap tests make a sweep provably "in flight" by holding a lock on the
// password-resets table, which it sweeps last: its batch there waits, visibly, in
// pg_stat_activity. (A row lock would not hold it: the sweep skips locked rows.)
import { expect } from 'chai';
import type pg from 'pg';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { useTestDatabase, type TestDatabase } from './support/database.js';
import { createReferenceSchema, insertRandomRows } from './support/fixtures.js';

async function prepare(database: TestDatabase, schema: string, count: number) {
  await createReferenceSchema(database, { schema });
  for (const kind of ['refresh_tokens', 'password_resets'] as const) {
    await insertRandomRows(database, { table: `${schema}.${kind}`, kind, count, seed: 0.25 });
  }
  return {
    REFRESH_TOKENS_TABLE: `${schema}.refresh_tokens`,
    PASSWORD_RESETS_TABLE: `${schema}.password_resets`,
  };
}

/** Locks the password-resets table against writes, so the sweep's batch that reaches it waits. */
async function holdPasswordResets(database: TestDatabase, schema: string) {
  const client: pg.PoolClient = await database.pool.connect();
  await client.query('BEGIN');
  await client.query(`LOCK TABLE ${schema}.password_resets IN SHARE MODE`);
  return {
    release: async () => {
      await client.query('COMMIT');
      client.release();
    },
  };
}

async function sweepIsWaitingOnALock(database: TestDatabase) {
  return waitFor(
    async () => {
      const rows = await database.query(
        `SELECT 1 FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'token-reaper'
           AND wait_event_type = 'Lock'`,
      );
      return rows.length > 0;
    },
    { timeoutMs: 15_000, message: 'a sweep batch waiting on the held lock' },
  );
}

function eventsOf(daemon: ProcessHandle, event: string) {
  return daemon.logs.filter((line) => line.event === event);
}

/** Every sweep.started is followed by its sweep.finished/failed before the next one starts. */
function expectNoOverlap(daemon: ProcessHandle) {
  let open = false;
  for (const line of daemon.logs) {
    if (line.event === 'sweep.started') {
      expect(open, 'a sweep started while another was running').to.equal(false);
      open = true;
    } else if (line.event === 'sweep.finished' || line.event === 'sweep.failed') {
      open = false;
    }
  }
}

async function stopGracefully(daemon: ProcessHandle) {
  daemon.signal('SIGTERM');
  const status = await daemon.exited;
  expect(status, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
  expect(eventsOf(daemon, 'daemon.stopped'), daemon.describeOutput()).to.have.length(1);
}

describe('token-reaper start', () => {
  const database = useTestDatabase('daemon');

  it('registers no schedule under NODE_ENV=test, and sweeps once on SIGUSR1', async () => {
    const tables = await prepare(database.current, 'signal', 5_000);
    const daemon = spawnDaemon(['start'], { DATABASE_URL: database.url, ...tables });
    const started = await daemon.waitForLog('daemon.started');
    expect(started).to.include({ schedule: null, channel: 'refresh_token_revoked' });
    expect(started.targets).to.have.length(2);

    daemon.signal('SIGUSR1');
    const finished = await daemon.waitForLog('sweep.finished');
    expect(finished).to.include({ trigger: 'signal' });
    expect(finished.deleted).to.be.greaterThan(0);
    expect(eventsOf(daemon, 'sweep.started')).to.have.length(1);
    await stopGracefully(daemon);
  });

  it('sweeps on its schedule when NODE_ENV is not test', async () => {
    const tables = await prepare(database.current, 'scheduled', 1_000);
    const daemon = spawnDaemon(['start'], {
      DATABASE_URL: database.url,
      NODE_ENV: undefined,
      REFRESH_TOKEN_CLEANUP_CRON: '* * * * * *',
      ...tables,
    });
    const started = await daemon.waitForLog('daemon.started');
    expect(started.schedule).to.equal('* * * * * *');
    expect(started.nextSweepAt).to.be.a('string');
    const finished = await daemon.waitForLog('sweep.finished');
    expect(finished).to.include({ trigger: 'schedule' });
    await stopGracefully(daemon);
  });

  it('never runs two sweeps at once when SIGUSR1 arrives in quick succession', async () => {
    const tables = await prepare(database.current, 'overlap', 5_000);
    const lock = await holdPasswordResets(database.current, 'overlap');
    const daemon = spawnDaemon(['start'], { DATABASE_URL: database.url, ...tables });
    try {
      await daemon.waitForLog('daemon.started');
      daemon.signal('SIGUSR1');
      daemon.signal('SIGUSR1');
      await daemon.waitForLog('sweep.started');
      await sweepIsWaitingOnALock(database.current);
      daemon.signal('SIGUSR1');
      const joined = await daemon.waitForLog('sweep.joined');
      expect(joined).to.include({ trigger: 'signal', runningTrigger: 'signal' });
      expect(eventsOf(daemon, 'sweep.started')).to.have.length(1);
    } finally {
      await lock.release();
    }
    await daemon.waitForLog('sweep.finished');
    expectNoOverlap(daemon);
    await stopGracefully(daemon);
    expectNoOverlap(daemon);
  });

  it('lets one of two processes sweep and makes the other log sweep.skipped', async () => {
    const tables = await prepare(database.current, 'replicas', 5_000);
    const lock = await holdPasswordResets(database.current, 'replicas');
    const first = spawnDaemon(['start'], { DATABASE_URL: database.url, ...tables });
    try {
      await first.waitForLog('daemon.started');
      first.signal('SIGUSR1');
      await first.waitForLog('sweep.started');
      await sweepIsWaitingOnALock(database.current);
      const second = await runCli(['sweep'], { DATABASE_URL: database.url, ...tables });
      expect(second.code, second.stderr).to.equal(0);
      const skipped = second.logs.find((line) => line.event === 'sweep.skipped');
      expect(skipped, second.stdout).to.include({ trigger: 'cli' });
      expect(second.logs.some((line) => line.event === 'sweep.started')).to.equal(false);
    } finally {
      await lock.release();
    }
    const finished = await first.waitForLog('sweep.finished');
    expect(finished.deleted).to.be.greaterThan(0);
    await stopGracefully(first);
  });

  it('exits 0 within 10 s on SIGTERM in the middle of a sweep of a large table', async function () {
    this.timeout(60_000);
    const tables = await prepare(database.current, 'large', 300_000);
    const daemon = spawnDaemon(['start'], {
      DATABASE_URL: database.url,
      LOG_LEVEL: 'debug',
      SWEEP_BATCH_PAGES: '1',
      ...tables,
    });
    await daemon.waitForLog('daemon.started');
    daemon.signal('SIGUSR1');
    await daemon.waitForLog('sweep.batch');
    const signalled = Date.now();
    await stopGracefully(daemon);
    expect(Date.now() - signalled).to.be.below(10_000);
    const finished = eventsOf(daemon, 'sweep.finished')[0];
    expect(finished, daemon.describeOutput()).to.include({ interrupted: true });
    const rows = await database.current.query(
      `SELECT count(*)::int AS count FROM large.refresh_tokens`,
    );
    expect(rows[0]!.count, 'the sweep was still far from done').to.be.greaterThan(150_000);
  });

  it('exits at once with 128+n when the stop signal comes again', async () => {
    const tables = await prepare(database.current, 'forced', 5_000);
    const lock = await holdPasswordResets(database.current, 'forced');
    const daemon = spawnDaemon(['start'], { DATABASE_URL: database.url, ...tables });
    try {
      await daemon.waitForLog('daemon.started');
      daemon.signal('SIGUSR1');
      await sweepIsWaitingOnALock(database.current);
      daemon.signal('SIGTERM');
      await daemon.waitForLog('daemon.stopping');
      daemon.signal('SIGTERM');
      const status = await daemon.exited;
      expect(status).to.deep.equal({ code: 128 + 15, signal: null });
    } finally {
      await lock.release();
    }
  });

  it('logs a failed sweep, keeps running, and sweeps successfully the next time', async () => {
    const tables = await prepare(database.current, 'failing', 2_000);
    const daemon = spawnDaemon(['start'], {
      DATABASE_URL: database.url,
      STATEMENT_TIMEOUT_MS: '300',
      ...tables,
    });
    await daemon.waitForLog('daemon.started');

    // A statement timeout: an ACCESS EXCLUSIVE lock keeps the sweep from reading the table.
    const locker = await database.current.pool.connect();
    await locker.query('BEGIN');
    await locker.query('LOCK TABLE failing.refresh_tokens IN ACCESS EXCLUSIVE MODE');
    daemon.signal('SIGUSR1');
    const timedOut = await daemon.waitForLog('sweep.failed');
    expect(timedOut.error).to.include({ code: '57014' });
    await locker.query('COMMIT');
    locker.release();
    let since = daemon.logs.length;
    daemon.signal('SIGUSR1');
    expect((await daemon.waitForLog('sweep.finished', undefined, since)).deleted).to.be.greaterThan(
      0,
    );

    // The table dropped under the running daemon, then created again.
    await database.current.query('DROP TABLE failing.refresh_tokens');
    since = daemon.logs.length;
    daemon.signal('SIGUSR1');
    const dropped = await daemon.waitForLog('sweep.failed', undefined, since);
    expect((dropped.error as { message: string }).message).to.include(
      'failing.refresh_tokens does not exist',
    );
    await database.current.query(
      `CREATE TABLE failing.refresh_tokens (LIKE signal.refresh_tokens INCLUDING ALL)`,
    );
    await insertRandomRows(database.current, {
      table: 'failing.refresh_tokens',
      kind: 'refresh_tokens',
      count: 500,
      seed: 0.75,
    });
    since = daemon.logs.length;
    daemon.signal('SIGUSR1');
    const recovered = await daemon.waitForLog('sweep.finished', undefined, since);
    expect(recovered.deleted).to.be.greaterThan(0);
    await stopGracefully(daemon);
  });
});
