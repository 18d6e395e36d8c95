// The command line as operators meet it: exit codes, one clear message on stderr that names
// the bad flag or variable, and no secret anywhere in the output.
import { expect } from 'chai';
import { runCli } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

const unreachable = 'postgres://reaper:hunter2@127.0.0.1:1/auth';

describe('the command line', () => {
  it('prints its usage for --help and exits 0', async () => {
    const result = await runCli(['--help'], {});
    expect(result.code).to.equal(0);
    expect(result.stdout)
      .to.include('Usage: token-reaper <command>')
      .and.include('sweep [--dry-run]');
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
            /unknown command "reap"\. Use start, sweep, install, explain or partition convert/,
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
});
