// Connections that survive what sits between the daemon and PostgreSQL:
// - PgBouncer in transaction mode (a real one, started by the test): the pool goes through it,
//   sending no startup parameter it refuses, with the statement timeout, TimeZone and
//   synchronous_commit applied in every statement's own transaction; LISTEN, the sweep's lock
//   and install go direct, to LISTEN_DATABASE_URL;
// - a backend that stops answering (kill -STOP): a pool query fails at the client-side
//   timeout instead of hanging, and the pool goes on with a new connection.
import { expect } from 'chai';
import pg from 'pg';
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import { clientTimeoutMs, createDatabasePool } from '../src/db.js';
import { serializeError } from '../src/logger.js';
import { createCapturingLogger } from './support/capture-logger.js';
import { runCli, spawnDaemon, waitFor } from './support/cli.js';
import {
  serverUrl,
  startOwnedServer,
  useTestDatabase,
  withServerClient,
  type OwnedServer,
} from './support/database.js';
import { createReferenceSchema, insertRandomRows } from './support/fixtures.js';
import {
  findPgBouncer,
  PGBOUNCER_MISSING,
  startPgBouncer,
  type PgBouncer,
} from './support/pgbouncer.js';

const logger = createCapturingLogger().logger;

const settingsRow = z.object({
  statementTimeout: z.string(),
  timeZone: z.string(),
  synchronousCommit: z.string(),
});
const settingsQuery = sql.type(settingsRow)`
  SELECT current_setting('statement_timeout') AS "statementTimeout",
         current_setting('TimeZone') AS "timeZone",
         current_setting('synchronous_commit') AS "synchronousCommit"`;

async function rejection(promise: Promise<unknown>, what: string): Promise<Error> {
  return promise.then(
    () => expect.fail(`${what} succeeded`),
    (error: unknown) => error as Error,
  );
}

describe('behind PgBouncer in transaction mode', function () {
  this.timeout(180_000);
  const executable = findPgBouncer();
  const database = useTestDatabase('pgbouncer');
  let bouncer: PgBouncer | undefined;

  before(async function () {
    if (executable === null) {
      console.error(`    skipping the PgBouncer tests: ${PGBOUNCER_MISSING}`);
      this.skip();
    }
    // Two server connections for all the daemon's clients, so that a transaction rarely finds
    // the server session the one before it used: what leaks from one shows.
    bouncer = await startPgBouncer(executable, serverUrl(), { poolSize: 2 });
    await createReferenceSchema(database.current, { passwordResetsTable: null });
  });

  after(async () => {
    await bouncer?.stop();
  });

  const pooled = () => bouncer!.url(database.name);
  /** The daemon's environment: the pool through PgBouncer, sessions direct. */
  const environment = (extra: Record<string, string> = {}) => ({
    DATABASE_URL: pooled(),
    LISTEN_DATABASE_URL: database.url,
    PASSWORD_RESETS_TABLE: 'none',
    ...extra,
  });

  async function withPool<T>(statementTimeoutMs: number, work: (pool: DatabasePool) => Promise<T>) {
    const pool = await createDatabasePool({ databaseUrl: pooled(), statementTimeoutMs }, logger, {
      maximumPoolSize: 3,
    });
    try {
      return await work(pool);
    } finally {
      await pool.end();
    }
  }

  /** Revokes 20 new tokens and waits until the daemon has deleted them. */
  async function revokeTwentyAndWait() {
    const ids = (
      await database.query<{ id: string }>(
        `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
         SELECT gen_random_uuid(), md5(random()::text || i), now() + interval '1 day'
         FROM generate_series(1, 20) i RETURNING id::text`,
      )
    ).map((row) => row.id);
    await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = ANY($1::uuid[])', [
      ids,
    ]);
    await waitFor(
      async () =>
        (
          await database.query<{ count: number }>(
            'SELECT count(*)::int AS count FROM refresh_tokens WHERE id = ANY($1::uuid[])',
            [ids],
          )
        )[0]!.count === 0,
      { message: 'the revoked tokens to be purged', timeoutMs: 10_000 },
    );
  }

  it('refuses a startup parameter, as a stock PgBouncer does', async () => {
    const client = new pg.Client({ connectionString: pooled(), statement_timeout: 1_000 });
    client.on('error', () => undefined);
    const failure = await rejection(client.connect(), 'a startup parameter through PgBouncer');
    expect(failure.message).to.match(/unsupported startup parameter: statement_timeout/);
  });

  it('carries the pool, every statement with its settings, none left on the server session', async () => {
    await withPool(4_321, async (pool) => {
      const expected = { statementTimeout: '4321ms', timeZone: 'UTC', synchronousCommit: 'off' };
      expect(await pool.one(settingsQuery)).to.deep.equal(expected);
      expect(await pool.transaction((transaction) => transaction.one(settingsQuery))).to.deep.equal(
        expected,
      );
      const clients = await bouncer!.console('SHOW CLIENTS');
      expect(
        clients.filter(
          (client) =>
            client.database === database.name && client.application_name === 'token-reaper',
        ),
      ).to.have.length.greaterThan(0);
    });
    // A client without settings of its own lands on the same two server sessions, and finds
    // the server's default there.
    const showTimeout = async (url: string) => {
      const client = new pg.Client({ connectionString: url });
      await client.connect();
      try {
        return (await client.query('SHOW statement_timeout')).rows;
      } finally {
        await client.end();
      }
    };
    const serverDefault = await showTimeout(database.url);
    for (let attempt = 0; attempt < 4; attempt += 1) {
      expect(await showTimeout(pooled())).to.deep.equal(serverDefault);
    }
  });

  it('holds STATEMENT_TIMEOUT_MS: a statement blocked on a lock fails at the timeout, not later', async () => {
    await withServerClient(async (locker) => {
      await locker.query('BEGIN');
      await locker.query('LOCK TABLE refresh_tokens IN ACCESS EXCLUSIVE MODE');
      try {
        await withPool(500, async (pool) => {
          const started = performance.now();
          const failure = await rejection(
            pool.query(sql.unsafe`SELECT count(*) FROM refresh_tokens`),
            'a statement blocked on a lock',
          );
          const elapsed = performance.now() - started;
          expect(serializeError(failure).code).to.equal('57014');
          expect(elapsed).to.be.within(450, 2_000);
        });
        // The same through the CLI: STATEMENT_TIMEOUT_MS reaches the statements.
        const started = performance.now();
        const sweep = await runCli(['sweep'], environment({ STATEMENT_TIMEOUT_MS: '500' }));
        expect(sweep.code, sweep.stdout + sweep.stderr).to.equal(1);
        expect(sweep.stdout + sweep.stderr).to.include('57014');
        expect(performance.now() - started).to.be.below(15_000);
      } finally {
        await locker.query('ROLLBACK');
      }
    }, database.url);
  });

  it('runs PURGE_SOURCE=poll entirely through PgBouncer: no LISTEN, no session, no connection of its own', async () => {
    const poll = { PURGE_SOURCE: 'poll', PURGE_POLL_INTERVAL_MS: '100' };
    // install needs a session (its lock, CREATE INDEX CONCURRENTLY); the daemon does not.
    const install = await runCli(['install'], environment(poll));
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    const daemon = spawnDaemon(['start'], { ...environment(poll), LISTEN_DATABASE_URL: undefined });
    await daemon.waitForLog('listener.caught_up');

    await revokeTwentyAndWait();
    await daemon.waitForLog('purge.polled');
    // No connection of the daemon's goes direct: the listener's and the session's are absent.
    const direct = await database.query(
      `SELECT application_name FROM pg_stat_activity WHERE datname = current_database()
       AND application_name IN ('token-reaper-listener', 'token-reaper-session')`,
    );
    expect(direct).to.deep.equal([]);

    daemon.signal('SIGTERM');
    expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
    // Back to notify for the tests that follow.
    const reinstall = await runCli(['install'], environment());
    expect(reinstall.code, reinstall.stderr + reinstall.stdout).to.equal(0);
  });

  it('runs a daemon that purges revocations, its pool through PgBouncer, its listener direct', async () => {
    const install = await runCli(['install'], environment());
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    const daemon = spawnDaemon(['start'], environment());
    await daemon.waitForLog('listener.caught_up');

    await revokeTwentyAndWait();
    await daemon.waitForLog((line) => line.event === 'purge.batch');

    // The pool's connections are PgBouncer's clients; the listener's is not, it is the server's.
    const clients = await bouncer!.console('SHOW CLIENTS');
    const names = clients
      .filter((client) => client.database === database.name)
      .map((client) => client.application_name);
    expect(names).to.include('token-reaper').and.not.include('token-reaper-listener');
    const listeners = await database.query(
      `SELECT 1 FROM pg_stat_activity WHERE datname = current_database()
       AND application_name = 'token-reaper-listener'`,
    );
    expect(listeners).to.have.length(1);

    daemon.signal('SIGTERM');
    expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
  });

  // Needs the sweep's advisory lock on a session connection (createSessionClient, on
  // LISTEN_DATABASE_URL). Through the pool, PgBouncer runs pg_try_advisory_lock and
  // pg_advisory_unlock on whichever server sessions it picks: the unlock misses, the lock stays
  // on a server session, and a later sweep that lands elsewhere is told another one is sweeping.
  it('runs 10 sweeps in a row under load, and none is told another token-reaper is sweeping', async () => {
    await insertRandomRows(database.current, { table: 'refresh_tokens', count: 4_000 });
    // Other clients' transactions through the same PgBouncer, so that each of the daemon's
    // transactions may land on either server session.
    let loading = true;
    const load = Array.from({ length: 3 }, async () => {
      const client = new pg.Client({ connectionString: pooled() });
      await client.connect();
      try {
        while (loading) await client.query('SELECT pg_sleep(0.002)');
      } finally {
        await client.end();
      }
    });
    const skipped: string[] = [];
    try {
      for (let run = 1; run <= 10; run += 1) {
        const sweep = await runCli(['sweep'], environment());
        const output = sweep.stdout + sweep.stderr;
        expect(sweep.code, output).to.equal(0);
        if (sweep.logs.some((line) => line.event === 'sweep.skipped')) {
          skipped.push(`sweep ${run}: ${output}`);
        } else {
          expect(sweep.logs.map((line) => line.event)).to.include('sweep.finished');
        }
      }
    } finally {
      loading = false;
      await Promise.all(load);
    }
    expect(skipped, skipped.join('\n')).to.deep.equal([]);
  });
});

describe('pool connections to a server of the test’s own', function () {
  this.timeout(60_000);
  let server: OwnedServer;
  let pool: DatabasePool;
  const statementTimeoutMs = 1_000;

  before(async () => {
    server = await startOwnedServer();
    pool = await createDatabasePool({ databaseUrl: server.url, statementTimeoutMs }, logger, {
      maximumPoolSize: 1,
    });
  });

  after(async () => {
    await pool?.end();
    await server?.dispose();
  });

  it('log in with a password given as ?password=, like every other connection', async () => {
    // The server wants the password; slonik's own parser dropped this form of it.
    const url = new URL(server.url);
    const password = decodeURIComponent(url.password);
    url.password = '';
    url.searchParams.set('password', password);
    const inQuery = await createDatabasePool(
      { databaseUrl: url.toString(), statementTimeoutMs },
      logger,
      { maximumPoolSize: 1 },
    );
    try {
      expect(
        await inQuery.oneFirst(sql.type(z.object({ one: z.number() }))`SELECT 1 AS one`),
      ).to.equal(1);
    } finally {
      await inQuery.end();
    }
    url.searchParams.set('password', 'not-the-password');
    const failure = await rejection(
      createDatabasePool({ databaseUrl: url.toString(), statementTimeoutMs }, logger, {
        maximumPoolSize: 1,
      }),
      'a wrong ?password=',
    );
    expect(failure.message).to.match(/password authentication failed/);
  });

  it('fail a query to a frozen backend at the client-side timeout, and go on with a new connection', async () => {
    const backendPid = sql.type(z.object({ pid: z.number() }))`SELECT pg_backend_pid() AS pid`;
    const frozen = await pool.oneFirst(backendPid);
    process.kill(frozen, 'SIGSTOP');
    try {
      const started = performance.now();
      const failure = await rejection(
        pool.query(sql.unsafe`SELECT 1`),
        'a query to a frozen backend',
      );
      const elapsed = performance.now() - started;
      const timeoutMs = clientTimeoutMs(statementTimeoutMs);
      expect(serializeError(failure).message).to.include(
        `the database did not answer within ${timeoutMs} ms`,
      );
      expect(elapsed).to.be.within(timeoutMs - 50, timeoutMs + 2_000);
      // The frozen backend is still stopped; the pool has left it for a new one.
      const replacement = await pool.oneFirst(backendPid);
      expect(replacement).not.to.equal(frozen);
    } finally {
      process.kill(frozen, 'SIGCONT');
    }
  });
});
