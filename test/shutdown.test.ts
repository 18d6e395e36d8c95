// SIGTERM exits 0 within 10 s in every state: while a sweep, a purge and a catch-up each meet
// rows another transaction holds locked, and while a statement waits on a lock of the whole
// table, which no lock wait of ours bounds: the stop cancels it at its deadline.
import { expect } from 'chai';
import pg from 'pg';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

const STOP_LIMIT_MS = 10_000;

describe('shutdown with a deadline', function () {
  this.timeout(180_000);
  const database = useTestDatabase('shutdown');
  const query = (text: string, parameters?: unknown[]) => database.query(text, parameters);
  const environment = () => ({ DATABASE_URL: database.url, PASSWORD_RESETS_TABLE: 'none' });
  let holder: pg.PoolClient | null = null;

  before(async () => {
    await createReferenceSchema(database.current, { passwordResetsTable: null });
    const install = await runCli(['install'], environment());
    expect(install.code, install.stderr + install.stdout).to.equal(0);
  });

  afterEach(async () => {
    await holder?.query('ROLLBACK').catch(() => undefined);
    holder?.release();
    holder = null;
  });

  /** An open transaction on another connection, running `statements`. */
  async function hold(...statements: string[]) {
    holder = await database.current.pool.connect();
    await holder.query('BEGIN');
    for (const statement of statements) await holder.query(statement);
  }

  async function insertTokens(count: number, revoked: boolean, expired = false) {
    await query(
      `INSERT INTO refresh_tokens (user_id, token_hash, revoked, expires_at)
       SELECT gen_random_uuid(), md5(random()::text || i), $2,
              now() + CASE WHEN $3 THEN -interval '1 day' ELSE interval '1 day' END
       FROM generate_series(1, $1::int) i`,
      [count, revoked, expired],
    );
  }

  /** SIGTERM, then the exit: code 0 and within the limit. */
  async function stopsInTime(daemon: ProcessHandle) {
    const started = Date.now();
    daemon.signal('SIGTERM');
    const exit = await daemon.exited;
    const tookMs = Date.now() - started;
    expect(exit, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
    expect(tookMs, 'milliseconds from SIGTERM to exit').to.be.below(STOP_LIMIT_MS);
    expect(daemon.logs.some((line) => line.event === 'daemon.stop_timeout')).to.equal(false);
  }

  it('exits 0 in time while a catch-up of 1,000,000 revoked rows meets a locked row', async () => {
    await query('TRUNCATE refresh_tokens');
    await insertTokens(1_000_000, true);
    await hold(`SELECT 1 FROM refresh_tokens WHERE revoked LIMIT 1 FOR KEY SHARE`);
    const daemon = spawnDaemon(['start'], environment());
    await daemon.waitForLog('daemon.started');
    // The catch-up is under way once rows start to go.
    await waitFor(
      async () =>
        ((await query('SELECT count(*)::int AS count FROM refresh_tokens'))[0]!.count as number) <
        1_000_000,
      { timeoutMs: 30_000, message: 'the catch-up to start deleting' },
    );
    await stopsInTime(daemon);
  });

  it('exits 0 in time while a sweep batch and a purge meet locked rows', async () => {
    await query('TRUNCATE refresh_tokens');
    await insertTokens(200_000, false, true);
    await insertTokens(10, false);
    await hold(
      `SELECT 1 FROM refresh_tokens WHERE expires_at < now() LIMIT 5 FOR KEY SHARE`,
      `SELECT 1 FROM refresh_tokens WHERE expires_at > now() LIMIT 5 FOR KEY SHARE`,
    );
    const daemon = spawnDaemon(['start'], { ...environment(), SWEEP_BATCH_PAGES: '50' });
    await daemon.waitForLog('listener.caught_up');
    daemon.signal('SIGUSR1');
    await daemon.waitForLog('sweep.started');
    await query(`UPDATE refresh_tokens SET revoked = true WHERE expires_at > now()`);
    await daemon.waitForLog((line) => line.event === 'purge.batch');
    await stopsInTime(daemon);
  });

  it('exits 0 in time while its statements wait on a lock of the whole table', async () => {
    await query('TRUNCATE refresh_tokens');
    await insertTokens(1_000, false, true);
    const daemon = spawnDaemon(['start'], environment());
    await daemon.waitForLog('listener.caught_up');
    // SHARE conflicts with the ROW EXCLUSIVE every delete takes first: the sweep's first batch
    // waits for it, up to the statement timeout, which is longer than a stop may take.
    await hold('LOCK TABLE refresh_tokens IN SHARE MODE');
    daemon.signal('SIGUSR1');
    await daemon.waitForLog('sweep.started');
    await waitFor(
      async () =>
        (
          await query(
            `SELECT 1 FROM pg_stat_activity WHERE datname = current_database()
             AND application_name = 'token-reaper' AND wait_event_type = 'Lock'`,
          )
        ).length > 0,
      { message: 'a statement of the daemon waiting on the table lock' },
    );
    await stopsInTime(daemon);
    // Cancelled, not abandoned: nothing of the daemon's is left waiting on the lock.
    const waiting = await query(
      `SELECT 1 FROM pg_stat_activity WHERE datname = current_database()
       AND application_name = 'token-reaper'`,
    );
    expect(waiting).to.deep.equal([]);
  });
});
