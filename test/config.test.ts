import { rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect } from 'chai';
import { DEFAULT_SCHEDULE, loadConfig } from '../src/config.js';
import { ConfigurationError } from '../src/errors.js';

const minimal = { DATABASE_URL: 'postgres://reaper:secret@db.internal:5432/auth' };

function problemsOf(environment: Record<string, string>): string[] {
  try {
    loadConfig(environment);
  } catch (error) {
    expect(error).to.be.instanceOf(ConfigurationError);
    return [...(error as ConfigurationError).problems];
  }
  expect.fail('loadConfig accepted a bad environment');
}

describe('config', () => {
  it('applies the documented defaults', () => {
    const config = loadConfig(minimal);
    expect(config.sweep.schedule).to.equal(DEFAULT_SCHEDULE).and.equal('0 3 * * *');
    expect(config.sweep.timezone).to.equal(null);
    expect(config.notifyChannel).to.equal('refresh_token_revoked');
    const [refreshTokens, passwordResets] = config.targets;
    expect(refreshTokens!.table.candidates[0]).to.deep.equal({
      schema: null,
      name: 'refresh_tokens',
    });
    expect(refreshTokens!.table.configured).to.equal(false);
    expect(passwordResets!.table.candidates[0]).to.deep.equal({
      schema: null,
      name: 'password_resets',
    });
    expect(refreshTokens!.marker!.column.configured).to.equal(false);
    expect(refreshTokens!.notify).to.equal(true);
    expect(passwordResets!.notify).to.equal(false);
    expect(config.naiveTimestampsTimezone).to.equal(null);
    expect(config.sweep.batchPages).to.equal(100);
    expect(config.sweep.concurrency).to.equal(1);
    expect(config.logLevel).to.equal('info');
    expect(config.scheduleEnabled).to.equal(true);
  });

  it('logs pretty on a terminal and JSON otherwise, unless LOG_FORMAT says which', () => {
    expect(loadConfig(minimal, { terminal: true }).logFormat).to.equal('pretty');
    expect(loadConfig(minimal, { terminal: false }).logFormat).to.equal('json');
    // Unsaid, the terminal is stdout's.
    expect(loadConfig(minimal).logFormat).to.equal(process.stdout.isTTY ? 'pretty' : 'json');
    expect(loadConfig({ ...minimal, LOG_FORMAT: 'json' }, { terminal: true }).logFormat).to.equal(
      'json',
    );
    expect(
      loadConfig({ ...minimal, LOG_FORMAT: ' Pretty ' }, { terminal: false }).logFormat,
    ).to.equal('pretty');
    expect(loadConfig({ ...minimal, LOG_FORMAT: '' }, { terminal: false }).logFormat).to.equal(
      'json',
    );
  });

  it('is frozen, so nothing downstream can change it', () => {
    const config = loadConfig(minimal);
    expect(Object.isFrozen(config)).to.equal(true);
    expect(Object.isFrozen(config.sweep)).to.equal(true);
    expect(Object.isFrozen(config.targets[0]!.table)).to.equal(true);
  });

  it('does not register the schedule when NODE_ENV is test', () => {
    expect(loadConfig({ ...minimal, NODE_ENV: 'test' }).scheduleEnabled).to.equal(false);
  });

  it('accepts schema-qualified tables, a six-field cron and a timezone', () => {
    const config = loadConfig({
      ...minimal,
      REFRESH_TOKENS_TABLE: 'auth.refresh_tokens',
      REFRESH_TOKEN_CLEANUP_CRON: '*/10 * * * * *',
      CLEANUP_TIMEZONE: 'Europe/Berlin',
      PASSWORD_RESETS_TABLE: 'none',
      REFRESH_TOKENS_REVOKED_COLUMN: 'revoked_at',
    });
    expect(config.targets[0]!.table.candidates).to.deep.equal([
      { schema: 'auth', name: 'refresh_tokens' },
    ]);
    expect(config.sweep.schedule).to.equal('*/10 * * * * *');
    expect(config.sweep.timezone).to.equal('Europe/Berlin');
    expect(config.targets).to.have.length(1);
    expect(config.targets[0]!.marker!.column).to.deep.equal({
      candidates: ['revoked_at'],
      configured: true,
    });
  });

  it('reads the revoked-token grace as a duration, for refresh tokens only', () => {
    const config = loadConfig({ ...minimal, REFRESH_TOKEN_REVOKED_GRACE: '15m' });
    expect(config.targets[0]!.marker!.graceSeconds).to.equal(900);
    expect(config.targets[1]!.marker!.graceSeconds).to.equal(0);
    expect(loadConfig(minimal).targets[0]!.marker!.graceSeconds).to.equal(0);
  });

  it('falls back to the PG* variables like psql does', () => {
    const config = loadConfig({
      PGHOST: 'db.internal',
      PGPORT: '6432',
      PGUSER: 'reaper',
      PGPASSWORD: 'p@ss/word',
      PGDATABASE: 'auth',
    });
    const url = new URL(config.databaseUrl);
    expect(url.hostname).to.equal('db.internal');
    expect(url.port).to.equal('6432');
    expect(decodeURIComponent(url.username)).to.equal('reaper');
    expect(decodeURIComponent(url.password)).to.equal('p@ss/word');
    expect(url.pathname).to.equal('/auth');
  });

  it('reports a missing DATABASE_URL and says how to set it', () => {
    const [problem] = problemsOf({});
    expect(problem)
      .to.match(/^DATABASE_URL is not set/)
      .and.include('postgres://');
  });

  it('reports a malformed DATABASE_URL without echoing its password', () => {
    const problems = problemsOf({ DATABASE_URL: 'mysql://root:hunter2@db/auth' });
    expect(problems).to.have.length(1);
    expect(problems[0]).to.include('DATABASE_URL').and.include('postgres://');
    expect(problems[0]).not.to.include('hunter2');
    expect(problemsOf({ DATABASE_URL: 'not a url' })[0]).to.include(
      'DATABASE_URL is not a valid URL',
    );
    const unsupported = problemsOf({
      DATABASE_URL: 'postgres://u:hunter2@db/auth?sslmode=bogus',
    });
    expect(unsupported[0]).to.include('sslmode').and.not.include('hunter2');
  });

  it('reports every bad variable at once, each naming the variable and the fix', () => {
    const problems = problemsOf({
      ...minimal,
      REFRESH_TOKEN_CLEANUP_CRON: '0 25 * * *',
      CLEANUP_TIMEZONE: 'Mars/Olympus',
      REFRESH_TOKENS_TABLE: 'refresh tokens; drop table users',
      PASSWORD_RESETS_TABLE: 'a.b.c',
      REFRESH_TOKEN_NOTIFY_CHANNEL: '1channel',
      LOG_LEVEL: 'loud',
      LOG_FORMAT: 'fancy',
      SWEEP_BATCH_PAGES: '0',
      SWEEP_CONCURRENCY: 'two',
      SWEEP_BATCH_TARGET_MS: '60001',
      SWEEP_PAUSE_RATIO: '-1',
      SWEEP_MAX_REPLICA_LAG: '5 parsecs',
      SWEEP_MAX_DURATION: '30 days',
      REFRESH_TOKENS_REVOKED_COLUMN: 'revoked-at',
      REFRESH_TOKEN_REVOKED_GRACE: '5 minutes',
    });
    const expectations: [string, RegExp][] = [
      ['REFRESH_TOKEN_CLEANUP_CRON', /not a valid cron expression.*"0 3 \* \* \*"/],
      ['CLEANUP_TIMEZONE', /not a known IANA timezone/],
      ['REFRESH_TOKENS_TABLE', /not a table name. Use table or schema\.table/],
      ['PASSWORD_RESETS_TABLE', /not a table name/],
      ['REFRESH_TOKEN_NOTIFY_CHANNEL', /not a valid name/],
      ['LOG_LEVEL', /Use one of error, warn, info/],
      ['LOG_FORMAT', /"fancy" is not a log format\. Use pretty or json/],
      ['SWEEP_BATCH_PAGES', /whole number from 1/],
      ['SWEEP_CONCURRENCY', /whole number from 1/],
      ['SWEEP_BATCH_TARGET_MS', /whole number from 0 to 60000/],
      ['SWEEP_PAUSE_RATIO', /not a number from 0 to 100, such as 0\.5/],
      [
        'SWEEP_MAX_REPLICA_LAG',
        /not a positive duration of at most 1 day\(s\)\. Use .*"90s".*unset it for no limit/,
      ],
      ['SWEEP_MAX_DURATION', /not a positive duration of at most 7 day/],
      ['REFRESH_TOKENS_REVOKED_COLUMN', /not a valid name/],
      ['REFRESH_TOKEN_REVOKED_GRACE', /not a duration\. Use .*90s, 15m, 1h or 7d/],
    ];
    expect(problems).to.have.length(expectations.length);
    for (const [variable, pattern] of expectations) {
      const problem = problems.find((candidate) => candidate.startsWith(`${variable}=`));
      expect(problem, variable).to.match(pattern);
    }
  });

  it('reads the sweep’s pacing: a time per batch, a pause ratio, a replica lag and a window', () => {
    expect(loadConfig(minimal).sweep).to.include({
      batchPages: 100,
      batchTargetMs: 20,
      pauseRatio: 20,
      maxReplicaLagMs: null,
      maxDurationMs: null,
    });
    const paced = loadConfig({
      ...minimal,
      SWEEP_BATCH_TARGET_MS: '50',
      SWEEP_PAUSE_RATIO: '0.25',
      SWEEP_MAX_REPLICA_LAG: '500ms',
      SWEEP_MAX_DURATION: '2 hours',
    }).sweep;
    expect(paced).to.include({
      batchTargetMs: 50,
      pauseRatio: 0.25,
      maxReplicaLagMs: 500,
      maxDurationMs: 7_200_000,
    });
    expect(loadConfig({ ...minimal, SWEEP_PAUSE_RATIO: '0' }).sweep.pauseRatio).to.equal(0);
  });

  describe('connection URLs', () => {
    const caFile = join(tmpdir(), `token-reaper-config-test-ca-${process.pid}.crt`);
    before(() => writeFileSync(caFile, 'read, not parsed, at startup'));
    after(() => rmSync(caFile, { force: true }));

    it('takes LISTEN_DATABASE_URL for session connections, DATABASE_URL by default', () => {
      expect(loadConfig(minimal).listenDatabaseUrl).to.equal(minimal.DATABASE_URL);
      const direct = 'postgres://reaper:secret@primary.internal:5432/auth';
      const config = loadConfig({
        DATABASE_URL: 'postgres://reaper:secret@pgbouncer.internal:6432/auth',
        LISTEN_DATABASE_URL: direct,
      });
      expect(config.listenDatabaseUrl).to.equal(direct);
    });

    it('reports a bad LISTEN_DATABASE_URL by name, without echoing its password', () => {
      const [malformed] = problemsOf({ ...minimal, LISTEN_DATABASE_URL: 'mysql://u:hunter2@db/a' });
      expect(malformed).to.match(/^LISTEN_DATABASE_URL must start with postgres:\/\//);
      const [unsupported] = problemsOf({
        ...minimal,
        LISTEN_DATABASE_URL: 'postgres://u:hunter2@db/auth?keepalives=1',
      });
      expect(unsupported)
        .to.match(/^LISTEN_DATABASE_URL .* the parameter "keepalives" is not supported/)
        .and.not.include('hunter2');
    });

    it('accepts a password in ?password= and the sslmodes that verify', () => {
      for (const query of [
        'password=hunter2',
        'sslmode=verify-full',
        `sslmode=verify-full&sslrootcert=${caFile}`,
        `sslmode=verify-ca&sslrootcert=${caFile}`,
        'sslmode=verify-full&sslrootcert=system',
        'sslmode=no-verify',
        'sslmode=disable',
      ]) {
        const url = `postgres://reaper@db.internal/auth?${query}`;
        expect(loadConfig({ DATABASE_URL: url }).databaseUrl, query).to.equal(url);
      }
    });

    it('refuses verify-ca without an authority, and the sslmodes that fall back to plain text', () => {
      const [verifyCa] = problemsOf({ DATABASE_URL: 'postgres://db/auth?sslmode=verify-ca' });
      expect(verifyCa).to.match(/verify-ca needs sslrootcert \(or PGSSLROOTCERT\)/);
      const [prefer] = problemsOf({ DATABASE_URL: 'postgres://db/auth?sslmode=prefer' });
      expect(prefer).to.match(/sslmode="prefer" is not supported.*unencrypted/);
    });

    it('names an sslrootcert that cannot be read', () => {
      const [problem] = problemsOf({
        DATABASE_URL: 'postgres://db/auth?sslmode=verify-full&sslrootcert=/no/such/ca.crt',
      });
      expect(problem).to.match(/sslrootcert names \/no\/such\/ca\.crt, which cannot be read/);
    });

    it('takes PGSSLROOTCERT for a URL that names no sslrootcert, as libpq does', () => {
      const config = loadConfig({
        DATABASE_URL: 'postgres://pgbouncer.internal/auth?sslmode=verify-full',
        LISTEN_DATABASE_URL: 'postgres://primary.internal/auth?sslmode=verify-ca',
        PGSSLROOTCERT: caFile,
      });
      for (const url of [config.databaseUrl, config.listenDatabaseUrl]) {
        expect(new URL(url).searchParams.get('sslrootcert')).to.equal(caFile);
      }
      const own = `postgres://db/auth?sslmode=verify-full&sslrootcert=${caFile}`;
      expect(
        loadConfig({ DATABASE_URL: own, PGSSLROOTCERT: '/no/such/ca.crt' }).databaseUrl,
      ).to.equal(own);
      // Without TLS there is no authority to read.
      expect(() => loadConfig({ ...minimal, PGSSLROOTCERT: '/no/such/ca.crt' })).not.to.throw();
    });
  });
});
