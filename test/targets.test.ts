// The target model from the outside: ORM tables found with nothing but DATABASE_URL and the
// zone, custom rules in a targets file, bad configuration reported whole, and explain.
import { expect } from 'chai';
import { useTestDatabase } from './support/database.js';
import { runCli } from './support/cli.js';
import { finishedSweep, targetsHarness, writeTargetsFile } from './support/targets.js';

describe('targets', () => {
  const database = useTestDatabase('targets');

  before(async () => {
    await database.query(`ALTER DATABASE ${database.name} SET timezone = 'Asia/Tokyo'`);
  });

  it('finds a Prisma schema (PascalCase, camelCase, timestamp(3)) with DATABASE_URL and the zone alone', async () => {
    await database.query(`CREATE SCHEMA prisma`);
    // As `prisma migrate` writes a RefreshToken and a PasswordReset model.
    await database.query(`
      CREATE TABLE prisma."RefreshToken" ("id" TEXT NOT NULL, "token" TEXT NOT NULL,
        "userId" TEXT NOT NULL, "revoked" BOOLEAN NOT NULL DEFAULT false,
        "expiresAt" TIMESTAMP(3) NOT NULL, "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
        CONSTRAINT "RefreshToken_pkey" PRIMARY KEY ("id"));
      CREATE TABLE prisma."PasswordReset" ("id" TEXT NOT NULL, "token" TEXT NOT NULL,
        "expiresAt" TIMESTAMP(3) NOT NULL, "usedAt" TIMESTAMP(3),
        CONSTRAINT "PasswordReset_pkey" PRIMARY KEY ("id"));
      INSERT INTO prisma."RefreshToken" (id, token, "userId", revoked, "expiresAt")
      SELECT 'rt' || g, md5(g::text), 'u', g % 4 = 0,
             (now() AT TIME ZONE 'UTC') + make_interval(hours => CASE WHEN g % 3 = 0 THEN -1 ELSE 5 END)
      FROM generate_series(1, 120) g;
      INSERT INTO prisma."PasswordReset" (id, token, "expiresAt", "usedAt")
      SELECT 'pr' || g, md5(g::text), (now() AT TIME ZONE 'UTC') + make_interval(mins => CASE WHEN g % 3 = 0 THEN -10 ELSE 50 END),
             CASE WHEN g % 5 = 0 THEN (now() AT TIME ZONE 'UTC') - interval '1 minute' END
      FROM generate_series(1, 120) g`);
    const environment = {
      DATABASE_URL: `${database.url}?options=-c%20search_path%3Dprisma`,
      NAIVE_TIMESTAMPS_TIMEZONE: 'UTC',
    };
    const result = await runCli(['sweep'], environment);
    expect(result.code, result.stderr).to.equal(0);
    const tokens = await database.query(`SELECT count(*)::int AS n FROM prisma."RefreshToken"`);
    // Kept: not revoked (g % 4 != 0) and not expired (g % 3 != 0).
    const liveTokens = Array.from({ length: 120 }, (_, i) => i + 1).filter(
      (g) => g % 4 !== 0 && g % 3 !== 0,
    ).length;
    expect(tokens[0]!.n).to.equal(liveTokens);
    const resets = await database.query(`SELECT count(*)::int AS n FROM prisma."PasswordReset"`);
    const liveResets = Array.from({ length: 120 }, (_, i) => i + 1).filter(
      (g) => g % 5 !== 0 && g % 3 !== 0,
    ).length;
    expect(resets[0]!.n).to.equal(liveResets);

    // Without the zone, every command refuses, naming the column and the variable.
    const refused = await runCli(['sweep'], { DATABASE_URL: environment.DATABASE_URL });
    expect(refused.code).to.equal(2);
    expect(refused.stderr).to.match(
      /prisma\.RefreshToken\.expiresAt is timestamp\(3\) without time zone.*NAIVE_TIMESTAMPS_TIMEZONE/,
    );
    expect(refused.stderr).to.match(
      /prisma\.PasswordReset\.expiresAt is timestamp\(3\) without time zone/,
    );
    expect(refused.stderr).not.to.include('(or NAIVE_TIMESTAMPS_TIMEZONE)');
    // A zone that does not exist is refused by name, before anything is read as a time.
    const unknown = await runCli(['sweep'], {
      DATABASE_URL: environment.DATABASE_URL,
      NAIVE_TIMESTAMPS_TIMEZONE: 'Mars/Olympus',
    });
    expect(unknown.code).to.equal(2);
    expect(unknown.stderr).to.include(
      'NAIVE_TIMESTAMPS_TIMEZONE="Mars/Olympus" is not a known IANA time zone',
    );
    // CET is a zone with summer time, but AT TIME ZONE 'CET' is the abbreviation, UTC+1 all year.
    const abbreviation = await runCli(['sweep'], {
      DATABASE_URL: environment.DATABASE_URL,
      NAIVE_TIMESTAMPS_TIMEZONE: 'cet',
    });
    expect(abbreviation.code).to.equal(2);
    expect(abbreviation.stderr).to.include(
      `the time zone "cet" (NAIVE_TIMESTAMPS_TIMEZONE) is read by PostgreSQL's AT TIME ZONE as the abbreviation CET`,
    );
  });

  it('finds a TypeORM schema (snake_case table, camelCase columns, timestamp) the same way', async () => {
    await database.query(`CREATE SCHEMA typeorm`);
    // As TypeORM's migration:generate writes a RefreshToken and a PasswordReset entity.
    await database.query(`
      CREATE TABLE typeorm."refresh_token" ("id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "token" character varying NOT NULL, "expiresAt" TIMESTAMP NOT NULL, "revokedAt" TIMESTAMP,
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        CONSTRAINT "PK_b575dd3c21fb0831013c909e7fe" PRIMARY KEY ("id"));
      CREATE TABLE typeorm."password_reset" ("id" SERIAL NOT NULL, "token" character varying NOT NULL,
        "expiresAt" TIMESTAMP NOT NULL, "used" boolean NOT NULL DEFAULT false,
        CONSTRAINT "PK_8515e60a2cc41584fa4784f52ce" PRIMARY KEY ("id"));
      INSERT INTO typeorm.refresh_token (token, "expiresAt", "revokedAt")
      SELECT md5(g::text), (now() AT TIME ZONE 'UTC') + make_interval(hours => CASE WHEN g % 3 = 0 THEN -2 ELSE 3 END),
             CASE WHEN g % 4 = 0 THEN (now() AT TIME ZONE 'UTC') - interval '5 minutes'
                  WHEN g % 4 = 1 THEN (now() AT TIME ZONE 'UTC') + interval '5 hours' END
      FROM generate_series(1, 120) g;
      INSERT INTO typeorm.password_reset (token, "expiresAt", used)
      SELECT md5(g::text), (now() AT TIME ZONE 'UTC') + make_interval(mins => CASE WHEN g % 3 = 0 THEN -10 ELSE 50 END), g % 5 = 0
      FROM generate_series(1, 120) g`);
    const result = await runCli(['sweep'], {
      DATABASE_URL: `${database.url}?options=-c%20search_path%3Dtypeorm`,
      // In lower case, as PostgreSQL itself accepts it.
      NAIVE_TIMESTAMPS_TIMEZONE: 'utc',
    });
    expect(result.code, result.stderr).to.equal(0);
    const tokens = await database.query(`SELECT count(*)::int AS n FROM typeorm.refresh_token`);
    expect(tokens[0]!.n).to.equal(
      Array.from({ length: 120 }, (_, i) => i + 1).filter((g) => g % 4 !== 0 && g % 3 !== 0).length,
    );
    const resets = await database.query(`SELECT count(*)::int AS n FROM typeorm.password_reset`);
    expect(resets[0]!.n).to.equal(
      Array.from({ length: 120 }, (_, i) => i + 1).filter((g) => g % 5 !== 0 && g % 3 !== 0).length,
    );
  });

  it('deletes exactly the dead rows of custom rules: a fixed lifetime, an inverted flag with a grace, per-row seconds', async () => {
    await database.query(`
      CREATE SCHEMA custom;
      CREATE TABLE custom.resets (email text PRIMARY KEY, created_at timestamptz NOT NULL);
      CREATE TABLE custom.sessions (id bigint PRIMARY KEY, active boolean, updated_at timestamptz NOT NULL,
                                    expires_at timestamptz);
      CREATE TABLE custom.grants (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, expires_in integer);
      INSERT INTO custom.resets SELECT 'r' || g, now() - make_interval(mins => g) FROM generate_series(1, 120) g;
      INSERT INTO custom.sessions
      SELECT g, CASE g % 3 WHEN 0 THEN false WHEN 1 THEN true END,
             now() - make_interval(hours => g % 48), now() + make_interval(days => CASE WHEN g % 7 = 0 THEN -9 ELSE 1 END)
      FROM generate_series(1, 120) g;
      INSERT INTO custom.grants SELECT g, now() - make_interval(secs => g * 10),
             CASE WHEN g % 10 = 0 THEN NULL ELSE 600 END FROM generate_series(1, 120) g`);
    const harness = await targetsHarness(database.url, [
      { table: 'custom.resets', expiry: { from: 'created_at', lifetime: '60 minutes' } },
      {
        table: 'custom.sessions',
        marker: { column: 'active', dead: false, grace: '24 hours', graceFrom: 'updated_at' },
        expiry: { column: 'expires_at' },
        keepExpiredFor: '7 days',
        notify: false,
      },
      {
        table: 'custom.grants',
        expiry: { from: 'created_at', lifetimeSecondsColumn: 'expires_in' },
      },
    ]);
    try {
      finishedSweep(await harness.sweeper.sweep('cli'));
    } finally {
      await harness.close();
    }
    const count = async (sql: string) => (await database.query(sql))[0]!.n as number;
    const numbers = Array.from({ length: 120 }, (_, i) => i + 1);
    // created_at + 60 minutes passed: g > 60 minutes old.
    expect(await count('SELECT count(*)::int AS n FROM custom.resets')).to.equal(
      numbers.filter((g) => g < 60).length,
    );
    // Inactive (false, never NULL) and updated over 24 hours ago; or expired over 7 days ago.
    expect(await count('SELECT count(*)::int AS n FROM custom.sessions')).to.equal(
      numbers.filter((g) => !((g % 3 === 0 && g % 48 >= 24) || g % 7 === 0)).length,
    );
    // created_at + expires_in passed: g * 10 > 600; NULL never expires.
    expect(await count('SELECT count(*)::int AS n FROM custom.grants')).to.equal(
      numbers.filter((g) => g % 10 === 0 || g * 10 < 600).length,
    );
  });

  it('reports every bad configuration in one run, with exit 2', async () => {
    await database.query(`
      CREATE SCHEMA bad;
      CREATE TABLE bad.secured (id uuid PRIMARY KEY, expires_at timestamptz);
      ALTER TABLE bad.secured ENABLE ROW LEVEL SECURITY;
      ALTER TABLE bad.secured FORCE ROW LEVEL SECURITY;
      CREATE TABLE bad.tokens (id bigint PRIMARY KEY, revoked text, expires_at timestamp);
      CREATE TABLE bad.parents (id bigint PRIMARY KEY, expires_at timestamptz);
      CREATE TABLE bad.children (parent_id bigint REFERENCES bad.parents (id) DEFERRABLE INITIALLY DEFERRED);
      CREATE TABLE bad."RefreshToken" (id text PRIMARY KEY, "expiresAt" timestamptz)`);
    const file = await writeTargetsFile({
      targets: [
        { preset: 'keycloak' },
        {
          table: 'bad.tokens',
          marker: { column: 'revoked' },
          expiry: { column: 'expires_at' },
          colour: 'red',
        },
        { table: 'bad.secured', expiry: { column: 'expires_at' } },
        { table: 'bad.parents', expiry: { column: 'expires_at' } },
        { table: 'bad.refresh_tokens', expiry: { column: 'expiresAt' } },
        { table: 'bad.tokens', marker: { column: 'revoked', dead: 'yes' } },
      ],
    });
    try {
      const syntax = await runCli(['explain', '--config', file.path], {
        DATABASE_URL: database.url,
      });
      expect(syntax.code).to.equal(2);
      expect(syntax.stderr).to.match(
        /targets\[0\]\.preset "keycloak" is not a preset\. Use one of laravel-passport/,
      );
      expect(syntax.stderr).to.match(/targets\[1\] has unknown key\(s\): 'colour'/);
      expect(syntax.stderr).to.match(/targets\[5\]\.marker\.dead Expected boolean/);

      const fixed = await writeTargetsFile({
        targets: [
          { table: 'bad.tokens', marker: { column: 'revoked' }, expiry: { column: 'expires_at' } },
          { table: 'bad.secured', expiry: { column: 'expires_at' } },
          { table: 'bad.parents', expiry: { column: 'expires_at' } },
          { table: 'bad.refresh_tokens', expiry: { column: 'expiresAt' } },
        ],
      });
      // Run as a role that does not bypass row-level security.
      await database.query(
        `DO $$ BEGIN CREATE ROLE reaper_norls LOGIN PASSWORD 'reaper_norls'; EXCEPTION WHEN duplicate_object THEN NULL; END $$`,
      );
      await database.query(
        `GRANT USAGE ON SCHEMA bad TO reaper_norls; GRANT SELECT, DELETE ON ALL TABLES IN SCHEMA bad TO reaper_norls`,
      );
      const url = new URL(database.url);
      url.username = 'reaper_norls';
      url.password = 'reaper_norls';
      const schema = await runCli(['explain', '--config', fixed.path], {
        DATABASE_URL: url.toString(),
      });
      await fixed.remove();
      expect(schema.code, schema.stderr + schema.stdout).to.equal(2);
      const output = schema.stdout;
      expect(output).to.match(/bad\.tokens\.revoked is text; a marker is a boolean or a timestamp/);
      expect(output).to.match(
        /bad\.tokens\.expires_at is timestamp without time zone.*NAIVE_TIMESTAMPS_TIMEZONE/,
      );
      expect(output).to.match(
        /bad\.secured has row-level security enabled, and this role does not bypass it/,
      );
      expect(output).to.match(
        /bad\.children\(parent_id\) → bad\.parents\(id\).*has no ON DELETE action, so deleting a referenced dead row fails at commit/,
      );
      expect(output).to.match(
        /table bad\.refresh_tokens does not exist.*Did you mean "bad\.RefreshToken"\?/,
      );
    } finally {
      await file.remove();
    }
  });

  it('explains a preset and a custom rule: the SQL, how time is read, what is in place, the counts', async () => {
    await database.query(`
      CREATE SCHEMA explained;
      CREATE TABLE explained.oauth_refresh_tokens (id char(80) PRIMARY KEY, access_token_id char(80) NOT NULL,
        revoked boolean NOT NULL, expires_at timestamp(0) without time zone);
      INSERT INTO explained.oauth_refresh_tokens
      SELECT lpad(g::text, 80, '0'), 'a', g % 2 = 0, (now() AT TIME ZONE 'UTC') + interval '1 day'
      FROM generate_series(1, 10) g;
      CREATE TABLE explained.resets (email text PRIMARY KEY, created_at timestamptz NOT NULL);
      INSERT INTO explained.resets VALUES ('a', now() - interval '2 hours'), ('b', now())`);
    const file = await writeTargetsFile({
      targets: [
        { preset: 'laravel-passport', only: ['oauth_refresh_tokens'], schema: 'explained' },
        { table: 'explained.resets', expiry: { from: 'created_at', lifetime: '60 minutes' } },
      ],
    });
    try {
      const environment = { DATABASE_URL: database.url, NAIVE_TIMESTAMPS_TIMEZONE: 'UTC' };
      const text = await runCli(['explain', '--config', file.path], environment);
      expect(text.code, text.stderr).to.equal(0);
      expect(text.stdout).to.include('explained.oauth_refresh_tokens');
      expect(text.stdout).to.match(
        /expiry\s+expires_at \(timestamp\(0\) without time zone: wall-clock time in UTC\)/,
      );
      expect(text.stdout).to.match(/kept expired\s+7 days/);
      expect(text.stdout).to.match(/revoke trigger\s+missing/);
      expect(text.stdout).to.match(/now\s+5 of 10 rows dead \(5 marked, 0 expired\)/);

      const json = await runCli(['explain', '--json', '--config', file.path], environment);
      expect(json.code, json.stderr).to.equal(0);
      const explanation = JSON.parse(json.stdout) as {
        targets: {
          table: string;
          sweepDeletes: string;
          purgeDeletes: string | null;
          counts: { dead: number };
        }[];
        problems: string[];
      };
      expect(explanation.problems).to.deep.equal([]);
      const [tokens, resets] = explanation.targets;
      expect(tokens!.sweepDeletes).to.equal(
        `(("explained"."oauth_refresh_tokens"."revoked" OR ("explained"."oauth_refresh_tokens"."expires_at" AT TIME ZONE 'UTC'::text) < now() - make_interval(secs => 604800)))`,
      );
      expect(tokens!.purgeDeletes).to.equal(`("explained"."oauth_refresh_tokens"."revoked")`);
      expect(resets!.sweepDeletes).to.equal(
        `((("explained"."resets"."created_at" + make_interval(secs => 3600)) < now()))`,
      );
      expect(resets!.purgeDeletes).to.equal(null);
      expect(resets!.counts.dead).to.equal(1);
    } finally {
      await file.remove();
    }
  });
});
