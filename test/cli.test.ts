// The command line as operators meet it: exit codes, one clear message on stderr that names
// the bad flag or variable, and no secret anywhere in the output.
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'chai';
import pg from 'pg';
import { runCli, waitFor, type ChildEnvironment, type CliResult } from './support/cli.js';
import {
  databaseUrl,
  startOwnedServer,
  useTestDatabase,
  withServerClient,
  type OwnedServer,
} from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

const unreachable = 'postgres://reaper:hunter2@127.0.0.1:1/auth';

describe('the command line', () => {
  it('prints its usage for --help and exits 0', async () => {
    const result = await runCli(['--help'], {});
    expect(result.code).to.equal(0);
    expect(result.stdout)
      .to.include('Usage: token-reaper <command>')
      .and.include('sweep [--dry-run]')
      .and.include('uninstall [--print]');
  });

  it('prints its version for --version and exits 0', async () => {
    const result = await runCli(['--version'], {});
    expect(result.code).to.equal(0);
    expect(result.stdout.trim()).to.match(/^\d+\.\d+\.\d+/);
  });

  describe('bad input exits 2 with one message that names what to fix', () => {
    const cases: { name: string; args: string[]; env: Record<string, string>; message: RegExp }[] =
      [
        {
          name: 'an unknown command',
          args: ['reap'],
          env: { DATABASE_URL: unreachable },
          message:
            /unknown command "reap"\. Use start, sweep, install, uninstall, explain or partition convert/,
        },
        {
          name: 'an unknown flag',
          args: ['sweep', '--force'],
          env: { DATABASE_URL: unreachable },
          message: /Unknown option '--force' for sweep\. It takes --config, --dry-run/,
        },
        {
          name: 'a flag of another command',
          args: ['start', '--print'],
          env: { DATABASE_URL: unreachable },
          message: /Unknown option '--print' for start\. It takes --config;/,
        },
        {
          name: 'a flag uninstall does not take',
          args: ['uninstall', '--role', 'x'],
          env: { DATABASE_URL: unreachable },
          message: /Unknown option '--role' for uninstall\. It takes --config, --print/,
        },
        {
          name: 'a bad cron expression',
          args: ['start'],
          env: { DATABASE_URL: unreachable, REFRESH_TOKEN_CLEANUP_CRON: '0 3 * *' },
          message: /REFRESH_TOKEN_CLEANUP_CRON="0 3 \* \*" is not a valid cron expression/,
        },
        {
          name: 'a malformed DATABASE_URL',
          args: ['sweep'],
          env: { DATABASE_URL: 'http://reaper:hunter2@db/auth' },
          message: /DATABASE_URL must start with postgres:\/\/ or postgresql:\/\//,
        },
        {
          name: 'a missing DATABASE_URL',
          args: ['sweep'],
          env: {},
          message: /DATABASE_URL is not set/,
        },
        {
          name: 'a bad table name',
          args: ['sweep'],
          env: { DATABASE_URL: unreachable, REFRESH_TOKENS_TABLE: 'tokens;drop' },
          message: /REFRESH_TOKENS_TABLE="tokens;drop" is not a table name/,
        },
      ];
    for (const { name, args, env, message } of cases) {
      it(`rejects ${name}`, async () => {
        const result = await runCli(args, env);
        expect(result.code, result.stderr).to.equal(2);
        expect(result.stderr).to.match(message);
        expect(result.stderr).to.include('token-reaper: ');
        expect(result.stdout + result.stderr).not.to.include('hunter2');
      });
    }

    it('reports several bad variables in one run', async () => {
      const result = await runCli(['start'], {
        DATABASE_URL: 'nonsense',
        LOG_LEVEL: 'loud',
        SWEEP_CONCURRENCY: '0',
      });
      expect(result.code).to.equal(2);
      const lines = result.stderr.trim().split('\n');
      expect(lines).to.have.length(3);
      expect(result.stderr)
        .to.include('DATABASE_URL')
        .and.include('LOG_LEVEL')
        .and.include('SWEEP_CONCURRENCY');
    });
  });

  describe('against a database', () => {
    const database = useTestDatabase('cli');

    before(async () => {
      await createReferenceSchema(database.current, { passwordResetsTable: null });
    });

    it('exits 2 and names a table that does not exist', async () => {
      const result = await runCli(['sweep'], {
        DATABASE_URL: database.url,
        REFRESH_TOKENS_TABLE: 'auth.tokens',
        PASSWORD_RESETS_TABLE: 'none',
      });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.match(/table auth\.tokens does not exist.*set REFRESH_TOKENS_TABLE/);
    });

    it('exits 2 and names a column that does not exist', async () => {
      const result = await runCli(['start'], {
        DATABASE_URL: database.url,
        PASSWORD_RESETS_TABLE: 'none',
        REFRESH_TOKENS_EXPIRES_AT_COLUMN: 'valid_until',
      });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.match(
        /public\.refresh_tokens has no column "valid_until"\. Set REFRESH_TOKENS_EXPIRES_AT_COLUMN/,
      );
    });

    it('exits 2 when a grace needs the revocations table that install has not created', async () => {
      const result = await runCli(['start'], {
        DATABASE_URL: database.url,
        PASSWORD_RESETS_TABLE: 'none',
        REFRESH_TOKEN_REVOKED_GRACE: '1h',
      });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.match(
        /the grace on public\.refresh_tokens needs token_reaper\.revocations .* Run "token-reaper install"/,
      );
    });

    it('exits 2 when the default password_resets table is missing, and says how to disable it', async () => {
      const result = await runCli(['sweep'], { DATABASE_URL: database.url });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.match(/table password_resets does not exist/);
      expect(result.stderr).to.include('PASSWORD_RESETS_TABLE');
    });
  });

  it('exits 1 when the database cannot be reached, and never prints the password', async () => {
    const result = await runCli(['sweep'], {
      DATABASE_URL: unreachable,
      PASSWORD_RESETS_TABLE: 'none',
    });
    expect(result.code).to.equal(1);
    expect(result.stdout + result.stderr).not.to.include('hunter2');
    expect(result.stderr).to.match(/ECONNREFUSED|connect/i);
  });

  describe('never prints a database password, in any form, on any path', function () {
    this.timeout(120_000);

    // Every fragment of these passwords holds "sekrit", so any leak of any part of one, raw or
    // percent-encoded, shows. The first has every character a URL treats specially; the second
    // only those a URL parser still accepts unencoded in the user part.
    const password = `Zx9 sekrit@sekrit:sekrit/sekrit?sekrit#sekrit&sekrit=sekrit%sekrit'sekrit"sekrit\\sekrit`;
    const rawPassword = `sekrit sekrit@sekrit:sekrit!$&'()*+,;=sekrit`;
    const leak = /sekrit/i;

    // A server of the test's own, because the test has to decide its pg_hba.conf: the trusted
    // role logs in whatever password it gives, so every form reaches every path the same way on
    // any machine (the pool ignores ?password=, for one); the other role needs its password, for
    // the wrong-password path.
    const trustedRole = 'reaper_trusted';
    const passwordRole = 'reaper_with_password';
    const databaseName = 'auth';
    let server: OwnedServer;
    let port: string;

    before(async () => {
      server = await startOwnedServer();
      port = new URL(server.url).port;
      const hba = join(server.dataDirectory, 'pg_hba.conf');
      await writeFile(
        hba,
        `host all ${trustedRole} 127.0.0.1/32 trust\n${await readFile(hba, 'utf8')}`,
      );
      await withServerClient(async (client) => {
        await client.query(`CREATE ROLE ${trustedRole} LOGIN SUPERUSER`);
        await client.query(`CREATE ROLE ${passwordRole} LOGIN PASSWORD 'the-right-one'`);
        await client.query(`CREATE DATABASE ${databaseName}`);
        await client.query('SELECT pg_reload_conf()');
      }, server.url);
      const pool = new pg.Pool({ connectionString: databaseUrl(databaseName, server.url), max: 1 });
      try {
        await createReferenceSchema(pool);
      } finally {
        await pool.end();
      }
      // The reload is asynchronous: wait until the trusted role gets in without a password.
      await waitFor(
        () =>
          withServerClient(
            () => Promise.resolve(true),
            `postgres://${trustedRole}@127.0.0.1:${port}/${databaseName}`,
          ),
        { retryErrors: true, message: `${trustedRole} to log in without a password` },
      );
    });

    after(async () => {
      await server?.dispose();
    });

    interface Connection {
      readonly role: string;
      readonly port: string;
      readonly database: string;
      readonly sslmode?: string;
    }

    // Each form turns a connection into the environment that carries it with the password.
    const forms: Record<string, (connection: Connection) => ChildEnvironment> = {
      'the user part, percent-encoded': (connection) => ({
        DATABASE_URL: url(connection, { userinfo: encodeURIComponent(password) }),
      }),
      'the user part, unencoded': (connection) => ({
        DATABASE_URL: url(connection, { userinfo: rawPassword }),
      }),
      '?password=': (connection) => ({
        DATABASE_URL: url(connection, { query: `password=${encodeURIComponent(password)}` }),
      }),
      '?sslpassword=': (connection) => ({
        DATABASE_URL: url(connection, { query: `sslpassword=${encodeURIComponent(password)}` }),
      }),
      PGPASSWORD: (connection) => ({
        PGHOST: '127.0.0.1',
        PGPORT: connection.port,
        PGUSER: connection.role,
        PGDATABASE: connection.database,
        PGPASSWORD: password,
        ...(connection.sslmode === undefined ? {} : { PGSSLMODE: connection.sslmode }),
      }),
    };

    function url(connection: Connection, secret: { userinfo?: string; query?: string }) {
      const parameters = [secret.query, connection.sslmode && `sslmode=${connection.sslmode}`]
        .filter(Boolean)
        .join('&');
      const user = secret.userinfo === undefined ? '' : `:${secret.userinfo}`;
      return (
        `postgres://${connection.role}${user}@127.0.0.1:${connection.port}/${connection.database}` +
        (parameters === '' ? '' : `?${parameters}`)
      );
    }

    const paths: {
      name: string;
      args: string[];
      connection: () => Connection;
      expectCode: number;
      expectOutput: RegExp;
    }[] = [
      {
        name: 'a bad sslmode',
        args: ['sweep'],
        connection: () => ({ role: trustedRole, port, database: databaseName, sslmode: 'bogus' }),
        expectCode: 2,
        expectOutput: /has a parameter token-reaper cannot use/,
      },
      {
        name: 'a port nothing listens on',
        args: ['sweep'],
        connection: () => ({ role: trustedRole, port: '1', database: databaseName }),
        expectCode: 1,
        expectOutput: /ECONNREFUSED/,
      },
      {
        name: 'a database that does not exist',
        args: ['explain'],
        connection: () => ({ role: trustedRole, port, database: 'no_such_database' }),
        expectCode: 1,
        expectOutput: /database "no_such_database" does not exist/,
      },
      {
        name: 'a wrong password',
        args: ['sweep'],
        connection: () => ({ role: passwordRole, port, database: databaseName }),
        expectCode: 1,
        // The pool ignores ?password= and ?sslpassword=, and so sends no password at all.
        expectOutput: /password authentication failed|empty password returned by client/,
      },
      {
        name: 'install --print',
        args: ['install', '--print'],
        connection: () => ({ role: trustedRole, port, database: databaseName }),
        expectCode: 0,
        expectOutput: /CREATE OR REPLACE FUNCTION/,
      },
      {
        name: 'explain',
        args: ['explain'],
        connection: () => ({ role: trustedRole, port, database: databaseName }),
        expectCode: 0,
        expectOutput: /refresh_tokens/,
      },
      {
        name: 'sweep',
        args: ['sweep'],
        connection: () => ({ role: trustedRole, port, database: databaseName }),
        expectCode: 0,
        // The runs race for the sweep's lock; the others skip, having connected all the same.
        expectOutput: /"event":"sweep\.(finished|skipped)"/,
      },
    ];

    function expectNoPassword(
      form: string,
      result: CliResult,
      expectCode: number,
      expectOutput: RegExp,
    ) {
      const output = `the password in ${form}\nstdout:\n${result.stdout}\nstderr:\n${result.stderr}`;
      expect(result.code, output).to.equal(expectCode);
      expect(result.stdout + result.stderr, output).to.match(expectOutput);
      expect(result.stdout + result.stderr, output).not.to.match(leak);
    }

    for (const { name, args, connection, expectCode, expectOutput } of paths) {
      it(`on ${name}, with the password in every form`, async () => {
        const runs = Object.entries(forms).map(async ([form, environment]) => {
          const result = await runCli(args, { LOG_LEVEL: 'debug', ...environment(connection()) });
          return { form, result };
        });
        for (const { form, result } of await Promise.all(runs)) {
          expectNoPassword(form, result, expectCode, expectOutput);
        }
      });
    }

    it('on a connection string that does not parse', async () => {
      const connection = { role: trustedRole, port, database: databaseName };
      const unparsable = [
        {
          form: 'a key/value string',
          value: `host=127.0.0.1 port=${port} user=${trustedRole} dbname=${databaseName} password='${password.replace(/['\\]/g, '\\$&')}'`,
          message: /DATABASE_URL is not a valid URL/,
        },
        {
          form: 'a URL whose password has a raw / ? #',
          value: url(connection, { userinfo: password }),
          message: /DATABASE_URL is not a valid URL/,
        },
        {
          // It parses as a URL, but the pool's own parser cannot decode it.
          form: 'a URL whose password has a raw % that is no escape',
          value: url(connection, { userinfo: 'sekrit%zzsekrit' }),
          message: /has a parameter token-reaper cannot use/,
        },
      ];
      const results = await Promise.all(
        unparsable.map(({ value }) => runCli(['sweep'], { DATABASE_URL: value })),
      );
      unparsable.forEach(({ form, message }, index) => {
        expectNoPassword(form, results[index]!, 2, message);
      });
    });
  });
});
