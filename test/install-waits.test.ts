// `install` behind the auth service's transactions: it says what it waits for, never holds the
// auth service's writes in the lock queue for more than a short attempt, and gives up after
// INSTALL_LOCK_TIMEOUT with the blocking pid, leaving nothing a later install cannot finish.
import { expect } from 'chai';
import pg from 'pg';
import { DDL_LOCK_ATTEMPT_TIMEOUT_MS } from '../src/install.js';
import { runCli, spawnDaemon, waitFor, type LogLine, type ProcessHandle } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

/** A token value in the blocking transaction's own query, which no log line may show. */
const SECRET = 'secret-token-value-3f9c';
const BLOCKER_APPLICATION = 'auth-service';

interface Blocker {
  pid: number;
  commit(): Promise<void>;
  /** Rolls back and disconnects; safe to call after commit. */
  end(): Promise<void>;
}

describe('install waits', () => {
  const database = useTestDatabase('install_waits');
  let environment: Record<string, string>;
  const blockers: Blocker[] = [];

  /** A session of the auth service that runs `statements` in a transaction and stays idle in it. */
  async function openTransaction(...statements: string[]): Promise<Blocker> {
    const client = new pg.Client({
      connectionString: database.url,
      application_name: BLOCKER_APPLICATION,
    });
    client.on('error', () => undefined);
    await client.connect();
    const pid = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!
      .pid;
    for (const statement of statements) await client.query(statement);
    let ended = false;
    const blocker: Blocker = {
      pid,
      commit: async () => {
        await client.query('COMMIT');
      },
      end: async () => {
        if (ended) return;
        ended = true;
        await client.query('ROLLBACK').catch(() => undefined);
        await client.end().catch(() => undefined);
      },
    };
    blockers.push(blocker);
    return blocker;
  }

  /** A transaction that has written a row of refresh_tokens: it holds ROW EXCLUSIVE on it. */
  const openWritingTransaction = () =>
    openTransaction(
      'BEGIN',
      `UPDATE refresh_tokens SET expires_at = expires_at
       WHERE token_hash <> '${SECRET}'
         AND id = (SELECT id FROM refresh_tokens ORDER BY token_hash LIMIT 1)`,
    );

  /** A transaction that holds a snapshot, which CREATE INDEX CONCURRENTLY must outlast. */
  const openSnapshotTransaction = () =>
    openTransaction(
      'BEGIN ISOLATION LEVEL REPEATABLE READ',
      `SELECT 1 FROM refresh_tokens WHERE token_hash <> '${SECRET}' LIMIT 1`,
    );

  const namesBlocker = (events: readonly string[], pid: number) => (line: LogLine) =>
    events.includes(line.event) &&
    Array.isArray(line.blockers) &&
    (line.blockers as { pid: number }[]).some((blocker) => blocker.pid === pid);

  async function expectInstalled(install: ProcessHandle) {
    const status = await install.exited;
    expect(status.code, install.describeOutput()).to.equal(0);
    expect(install.logs.some((line) => line.event === 'install.finished')).to.equal(true);
    expect(install.stdout).not.to.include(SECRET);
  }

  async function triggerCount() {
    const rows = await database.query(
      `SELECT count(*)::int AS count FROM pg_trigger
       WHERE tgrelid = 'public.refresh_tokens'::regclass AND NOT tgisinternal`,
    );
    return rows[0]!.count as number;
  }

  before(async () => {
    await createReferenceSchema(database.current);
    await database.query(
      `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
       SELECT gen_random_uuid(), md5(i::text), now() + interval '1 day'
       FROM generate_series(1, 10) i`,
    );
    environment = { DATABASE_URL: database.url };
  });

  // Every test starts from a database install has never touched.
  beforeEach(async () => {
    await database.query('DROP SCHEMA IF EXISTS token_reaper CASCADE');
    await database.query(
      `DROP INDEX IF EXISTS refresh_tokens_expires_at_idx, refresh_tokens_revoked_idx,
         password_resets_expires_at_idx`,
    );
  });

  afterEach(async () => {
    await Promise.all(blockers.splice(0).map((blocker) => blocker.end()));
  });

  it('names a writing transaction in its way, and finishes once it commits', async () => {
    const blocker = await openWritingTransaction();
    const install = spawnDaemon(['install'], environment);

    const waiting = await install.waitForLog(namesBlocker(['install.waiting'], blocker.pid));
    expect(waiting.file).to.equal('003-revoke-trigger.sql');
    const [described] = waiting.blockers as Record<string, unknown>[];
    expect(described).to.have.all.keys(
      'pid',
      'applicationName',
      'state',
      'xactStart',
      'queryStart',
      'waitEventType',
    );
    expect(described).to.include({
      pid: blocker.pid,
      applicationName: BLOCKER_APPLICATION,
      state: 'idle in transaction',
    });
    expect(Date.parse(described!.xactStart as string)).to.be.above(0);
    const attempt = await install.waitForLog(namesBlocker(['install.lock_timeout'], blocker.pid));
    expect(attempt).to.include({ file: '003-revoke-trigger.sql', level: 'warn' });
    expect(attempt.message).to.include(`pid ${blocker.pid}`);

    await blocker.commit();
    await expectInstalled(install);
    expect(await triggerCount()).to.equal(1);
  });

  it('names a transaction whose snapshot a concurrent index build waits for', async () => {
    const blocker = await openSnapshotTransaction();
    const install = spawnDaemon(['install'], environment);

    const waiting = await install.waitForLog(namesBlocker(['install.waiting'], blocker.pid));
    expect(waiting.file).to.equal('004-expiry-index.sql');
    expect(waiting.message).to.include(`pid ${blocker.pid}`);

    await blocker.commit();
    await expectInstalled(install);
  });

  it('gives up on DDL after INSTALL_LOCK_TIMEOUT, naming the blocker, and changes nothing', async () => {
    const blocker = await openWritingTransaction();
    const started = performance.now();
    const failed = await runCli(['install'], { ...environment, INSTALL_LOCK_TIMEOUT: '3s' });
    const elapsedMs = performance.now() - started;

    expect(failed.code, failed.stderr).to.equal(1);
    expect(failed.stderr).to.include('gave up on 003-revoke-trigger.sql');
    expect(failed.stderr).to.include(`pid ${blocker.pid}`);
    expect(failed.stderr).to.include('INSTALL_LOCK_TIMEOUT');
    expect(failed.stdout + failed.stderr).not.to.include(SECRET);
    // From the first attempt to giving up: the budget plus at most one more attempt.
    const timeOf = (event: string) =>
      Date.parse(failed.logs.find((line) => line.event === event)!.timestamp);
    expect(timeOf('command.failed') - timeOf('install.lock_timeout')).to.be.below(
      3_000 + DDL_LOCK_ATTEMPT_TIMEOUT_MS + 1_000,
    );
    // And the process's start and stop, on a busy machine.
    expect(elapsedMs).to.be.below(20_000);
    expect(await triggerCount()).to.equal(0);

    await blocker.end();
    const again = await runCli(['install'], environment);
    expect(again.code, again.stderr).to.equal(0);
    expect(await triggerCount()).to.equal(1);
  });

  it('gives up on a concurrent build after INSTALL_LOCK_TIMEOUT, and the next install rebuilds it', async () => {
    const blocker = await openSnapshotTransaction();
    const failed = await runCli(['install'], { ...environment, INSTALL_LOCK_TIMEOUT: '3s' });

    expect(failed.code, failed.stderr).to.equal(1);
    expect(failed.stderr).to.include('gave up on 004-expiry-index.sql');
    expect(failed.stderr).to.include(`pid ${blocker.pid}`);
    expect(failed.stderr).to.include('left invalid');
    const left = await database.query(
      `SELECT indisvalid AS valid FROM pg_index
       WHERE indexrelid = 'public.refresh_tokens_expires_at_idx'::regclass`,
    );
    expect(left).to.deep.equal([{ valid: false }]);

    await blocker.end();
    const again = await runCli(['install'], environment);
    expect(again.code, again.stderr).to.equal(0);
    expect(again.logs.some((line) => line.event === 'install.invalid_index')).to.equal(true);
    const rebuilt = await database.query(
      `SELECT indisvalid AS valid FROM pg_index
       WHERE indexrelid = 'public.refresh_tokens_expires_at_idx'::regclass`,
    );
    expect(rebuilt).to.deep.equal([{ valid: true }]);
  });

  it("holds the auth service's writes no longer than one short lock attempt", async () => {
    const blocker = await openWritingTransaction();
    const install = spawnDaemon(['install'], environment);

    // CREATE TRIGGER in the lock queue behind the blocker: a write that comes now queues too.
    await waitFor(
      async () => {
        const rows = await database.query(
          `SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE NOT l.granted AND l.mode = 'ShareRowExclusiveLock'
             AND l.relation = 'public.refresh_tokens'::regclass
             AND a.application_name = 'token-reaper'`,
        );
        return rows.length > 0;
      },
      { message: 'install waiting for its lock on refresh_tokens' },
    );
    // A write held until the blocker ends would wait forever here: the statement timeout turns
    // that into a failure that says so.
    const writer = await database.pool.connect();
    const writeStarted = performance.now();
    try {
      await writer.query('BEGIN');
      await writer.query(`SET LOCAL statement_timeout = '10s'`);
      await writer.query(
        `UPDATE refresh_tokens SET expires_at = expires_at + interval '1 minute'
         WHERE id = (SELECT id FROM refresh_tokens ORDER BY token_hash DESC LIMIT 1)`,
      );
      await writer.query('COMMIT');
    } finally {
      writer.release();
    }
    const writeMs = performance.now() - writeStarted;
    expect(writeMs).to.be.below(DDL_LOCK_ATTEMPT_TIMEOUT_MS + 1_000);

    const [session] = await database.query(`SELECT state FROM pg_stat_activity WHERE pid = $1`, [
      blocker.pid,
    ]);
    expect(session).to.deep.equal({ state: 'idle in transaction' });
    await blocker.commit();
    await expectInstalled(install);
  });
});
