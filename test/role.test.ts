// `install --role`: the daemon runs its whole cycle as a role that holds only what install
// grants it, on plain tables, with a grace, and on a table partitioned by expiry; the role can
// do nothing more; install --role is idempotent and --print shows exactly what it runs; a bad
// role name exits 2.
//
// Roles are cluster-wide, so every role here has a name of its own for this run, and each
// block drops its roles afterwards (with what they own or were granted, when a failure kept
// the block's database).
import { expect } from 'chai';
import pg from 'pg';
import {
  runCli,
  spawnDaemon,
  waitFor,
  type CliResult,
  type LogLine,
  type ProcessHandle,
} from './support/cli.js';
import {
  useTestDatabase,
  withServerClient,
  type TestDatabase,
  type TestDatabaseHandle,
} from './support/database.js';
import { giveLogin, urlAs, useRoles } from './support/roles.js';
import {
  createPartitionedTable,
  createReferenceSchema,
  dayOffset,
  deadCount,
  insertRandomRows,
  insertSpreadRows,
} from './support/fixtures.js';

const PERMISSION_DENIED = '42501';

function succeeded(result: CliResult) {
  expect(result.code, result.stderr + result.stdout).to.equal(0);
  return result;
}

/** Every privilege the role holds in this database: on relations, schemas, the database, roles. */
async function privilegesOf(database: TestDatabase | TestDatabaseHandle, role: string) {
  const rows = await database.query<{ privilege: string }>(
    `SELECT 'table ' || c.oid::regclass::text || ' ' || a.privilege_type AS privilege
     FROM pg_class c, aclexplode(c.relacl) a WHERE a.grantee = to_regrole($1)
     UNION ALL
     SELECT 'column ' || c.oid::regclass::text || '.' || att.attname || ' ' || a.privilege_type
     FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid, aclexplode(att.attacl) a
     WHERE a.grantee = to_regrole($1)
     UNION ALL
     SELECT 'schema ' || n.nspname || ' ' || a.privilege_type
     FROM pg_namespace n, aclexplode(n.nspacl) a WHERE a.grantee = to_regrole($1)
     UNION ALL
     SELECT 'database ' || d.datname || ' ' || a.privilege_type
     FROM pg_database d, aclexplode(d.datacl) a
     WHERE a.grantee = to_regrole($1) AND d.datname = current_database()
     UNION ALL
     SELECT 'function ' || p.oid::regprocedure::text || ' ' || a.privilege_type
     FROM pg_proc p, aclexplode(p.proacl) a WHERE a.grantee = to_regrole($1)
     UNION ALL
     SELECT 'member of ' || m.roleid::regrole::text FROM pg_auth_members m
     WHERE m.member = to_regrole($1)
     ORDER BY 1`,
    [role],
  );
  return rows.map((row) => row.privilege);
}

/** Renames the role in a privilege list, to compare two roles' lists. */
function renamed(privileges: readonly string[], from: string, to: string) {
  return privileges.map((privilege) => privilege.split(from).join(to));
}

async function expectDenied(client: pg.Client, statement: string) {
  const error = await client.query(statement).then(
    () => null,
    (failure: unknown) => failure as pg.DatabaseError,
  );
  expect(error, `${statement} should be refused`).not.to.equal(null);
  expect(error!.code, `${statement}: ${error!.message}`).to.equal(PERMISSION_DENIED);
}

/** No log line reports a failure or a refused privilege. */
function expectNoFailures(logs: readonly LogLine[]) {
  const failures = logs.filter(
    (line) =>
      /failed|error|warning/.test(line.event) ||
      line.level === 'error' ||
      /permission denied|must be owner|42501/.test(JSON.stringify(line)),
  );
  expect(failures).to.deep.equal([]);
}

async function stopDaemon(daemon: ProcessHandle) {
  daemon.signal('SIGTERM');
  expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
}

/** Inserts live tokens and returns their ids. */
async function liveTokens(database: TestDatabaseHandle, table: string, count: number) {
  const rows = await database.query<{ id: string }>(
    `INSERT INTO ${table} (user_id, token_hash, expires_at)
     SELECT gen_random_uuid(), md5(random()::text || i), now() + interval '1 day'
     FROM generate_series(1, ${count}) i RETURNING id::text`,
  );
  return rows.map((row) => row.id);
}

async function remaining(database: TestDatabaseHandle, table: string, ids: string[]) {
  const rows = await database.query<{ count: number }>(
    `SELECT count(*)::int AS count FROM ${table} WHERE id = ANY($1::uuid[])`,
    [ids],
  );
  return rows[0]!.count;
}

describe('install --role', () => {
  describe('on plain tables', () => {
    const database = useTestDatabase('role plain');
    const roleName = useRoles(database);
    let role: string;
    let roleUrl: string;
    let firstInstall: CliResult;
    let createdAttributes: Record<string, boolean>;

    before(async function () {
      this.timeout(60_000);
      await createReferenceSchema(database.current);
      await database.query('CREATE TABLE public.users (id uuid PRIMARY KEY, email text)');
      role = roleName('daemon');
      firstInstall = succeeded(
        await runCli(['install', '--role', role], { DATABASE_URL: database.url }),
      );
      const attributes = await database.query(
        `SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls,
                rolinherit
         FROM pg_roles WHERE rolname = $1`,
        [role],
      );
      createdAttributes = attributes[0]!;
      await giveLogin(database, role);
      roleUrl = urlAs(database.url, role);
    });

    it('creates the role NOLOGIN with no attributes, and logs it', () => {
      expect(createdAttributes).to.deep.equal({
        rolcanlogin: false,
        rolsuper: false,
        rolcreaterole: false,
        rolcreatedb: false,
        rolreplication: false,
        rolbypassrls: false,
        rolinherit: true,
      });
      const applied = firstInstall.logs.find((line) => line.event === 'install.role_applied');
      expect(applied).to.include({ role, created: true });
      const finished = firstInstall.logs.findIndex((line) => line.event === 'install.finished');
      expect(finished, 'the install plan runs first').to.be.greaterThan(-1);
      expect(firstInstall.logs.indexOf(applied!)).to.be.greaterThan(finished);
    });

    it('grants CONNECT, USAGE on the schemas, SELECT and DELETE on each table, the sweep positions, and nothing else', async () => {
      expect(await privilegesOf(database, role)).to.deep.equal([
        `database ${database.name} CONNECT`,
        'schema public USAGE',
        'schema token_reaper USAGE',
        'table password_resets DELETE',
        'table password_resets SELECT',
        'table refresh_tokens DELETE',
        'table refresh_tokens SELECT',
        'table token_reaper.sweep_positions DELETE',
        'table token_reaper.sweep_positions INSERT',
        'table token_reaper.sweep_positions SELECT',
        'table token_reaper.sweep_positions UPDATE',
      ]);
    });

    it('does not record the role in token_reaper.schema_version', async () => {
      const rows = await database.query(
        `SELECT name FROM token_reaper.schema_version WHERE name NOT LIKE '0%.sql'`,
      );
      expect(rows).to.deep.equal([]);
    });

    it('runs the daemon’s whole cycle as the role: catch-up, purge, SIGUSR1 sweep, stop', async function () {
      this.timeout(60_000);
      await insertRandomRows(database.current, { table: 'refresh_tokens', count: 4_000 });
      await insertRandomRows(database.current, { table: 'password_resets', count: 2_000 });
      const [{ spawned }] = (await database.query('SELECT now() AS spawned')) as [
        { spawned: Date },
      ];
      const daemon = spawnDaemon(['start'], { DATABASE_URL: roleUrl, LOG_LEVEL: 'debug' });
      const started = await daemon.waitForLog('daemon.started');
      expect(started['targets']).to.have.length(2);
      // The revoked rows already there go in the catch-up, leaf by leaf.
      const caughtUp = await daemon.waitForLog('listener.caught_up');
      expect(caughtUp['deleted']).to.be.greaterThan(0);

      const [id] = await liveTokens(database, 'refresh_tokens', 1);
      await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [id]);
      const batch = await daemon.waitForLog(
        (line) => line.event === 'purge.batch' && line['deleted'] === 1,
      );
      expect(batch).to.include({ ids: 1, deleted: 1 });
      expect(await remaining(database, 'refresh_tokens', [id!])).to.equal(0);

      const since = daemon.logs.length;
      daemon.signal('SIGUSR1');
      const finished = await daemon.waitForLog('sweep.finished', 30_000, since);
      expect(finished['deleted']).to.be.greaterThan(0);
      expect(
        await deadCount(database.current, { table: 'refresh_tokens', kind: 'refresh_tokens' }),
      ).to.equal(0);
      expect(
        await deadCount(database.current, { table: 'password_resets', kind: 'password_resets' }),
      ).to.equal(0);

      // Every connection of the daemon is the role's.
      const sessions = await database.query<{ user: string }>(
        `SELECT DISTINCT usename AS user FROM pg_stat_activity
         WHERE application_name LIKE 'token-reaper%' AND datname = current_database()
           AND backend_start >= $1`,
        [spawned],
      );
      expect(sessions).to.deep.equal([{ user: role }]);

      await stopDaemon(daemon);
      expectNoFailures(daemon.logs);
    });

    it('runs `token-reaper sweep` and `sweep --dry-run` as the role', async function () {
      this.timeout(60_000);
      await insertRandomRows(database.current, { table: 'refresh_tokens', count: 2_000 });
      const environment = { DATABASE_URL: roleUrl, LOG_LEVEL: 'debug' };
      const dryRun = succeeded(await runCli(['sweep', '--dry-run'], environment));
      const counted = dryRun.logs.find((line) => line.event === 'sweep.finished');
      expect(counted?.['wouldDelete']).to.be.greaterThan(0);
      expectNoFailures(dryRun.logs);

      const sweep = succeeded(await runCli(['sweep'], environment));
      const finished = sweep.logs.find((line) => line.event === 'sweep.finished');
      expect(finished?.['deleted']).to.equal(counted?.['wouldDelete']);
      expectNoFailures(sweep.logs);
      expect(
        await deadCount(database.current, { table: 'refresh_tokens', kind: 'refresh_tokens' }),
      ).to.equal(0);
    });

    it('gives the role nothing more: no writes, no other table, no DDL, nothing else of token_reaper', async () => {
      await withServerClient(async (client) => {
        await expectDenied(client, `UPDATE refresh_tokens SET revoked = true`);
        await expectDenied(
          client,
          `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
           VALUES (gen_random_uuid(), 'x', now())`,
        );
        await expectDenied(client, `UPDATE password_resets SET used = true`);
        await expectDenied(client, `TRUNCATE refresh_tokens`);
        await expectDenied(client, `SELECT * FROM public.users`);
        await expectDenied(client, `DELETE FROM public.users`);
        await expectDenied(client, `SELECT * FROM token_reaper.schema_version`);
        await expectDenied(client, `ALTER TABLE refresh_tokens ADD COLUMN extra int`);
        await expectDenied(client, `DROP TABLE refresh_tokens`);
        await expectDenied(client, `CREATE TABLE public.intruder (id int)`);
        await expectDenied(client, `CREATE SCHEMA intruder`);
        await expectDenied(client, `SET ROLE postgres`);
        // And what it has needs no privilege beyond its grants (verified, not assumed).
        const free = await client.query(
          `SELECT pg_relation_size('refresh_tokens') >= 0 AS size,
                  pg_try_advisory_lock(1, 1) AS locked, pg_advisory_unlock(1, 1) AS unlocked`,
        );
        expect(free.rows[0]).to.deep.equal({ size: true, locked: true, unlocked: true });
        await client.query('LISTEN refresh_token_revoked');
      }, roleUrl);
    });

    it('is idempotent: install --role again changes no privilege and records nothing', async () => {
      const before = await privilegesOf(database, role);
      const versions = await database.query('SELECT * FROM token_reaper.schema_version');
      const again = succeeded(
        await runCli(['install', '--role', role], { DATABASE_URL: database.url }),
      );
      expect(again.logs.find((line) => line.event === 'install.role_applied')).to.include({
        role,
        created: false,
      });
      expect(await privilegesOf(database, role)).to.deep.equal(before);
      expect(await database.query('SELECT * FROM token_reaper.schema_version')).to.deep.equal(
        versions,
      );
      // An existing role keeps its attributes: the LOGIN given above is still there.
      const login = await database.query('SELECT rolcanlogin FROM pg_roles WHERE rolname = $1', [
        role,
      ]);
      expect(login[0]!['rolcanlogin']).to.equal(true);
    });

    it('--print shows the role plan after the install plan, changes nothing, and runs as printed', async () => {
      const other = roleName('printed');
      const printed = succeeded(
        await runCli(['install', '--role', other, '--print'], { DATABASE_URL: database.url }),
      );
      const start = printed.stdout.indexOf('-- token-reaper role plan');
      expect(start).to.be.greaterThan(printed.stdout.indexOf('-- token-reaper install plan'));
      expect(printed.stdout).to.include(`LOGIN PASSWORD`);
      const exists = await database.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [other]);
      expect(exists).to.deep.equal([]);

      // What a DBA does with it: run the printed role plan as it is.
      await database.query(printed.stdout.slice(start));
      expect(await privilegesOf(database, other)).to.deep.equal(
        renamed(await privilegesOf(database, role), role, other),
      );
    });

    it('grants pg_read_all_stats only when SWEEP_MAX_REPLICA_LAG is set', async () => {
      const other = roleName('lag');
      const plain = succeeded(
        await runCli(['install', '--role', other, '--print'], { DATABASE_URL: database.url }),
      );
      expect(plain.stdout).to.not.include('pg_read_all_stats');
      const lagging = succeeded(
        await runCli(['install', '--role', other, '--print'], {
          DATABASE_URL: database.url,
          SWEEP_MAX_REPLICA_LAG: '5s',
        }),
      );
      expect(lagging.stdout).to.include(`GRANT pg_read_all_stats TO "${other}";`);
    });

    it('refuses a superuser role, before changing anything', async () => {
      const [{ user }] = (await database.query('SELECT current_user AS user')) as [
        { user: string },
      ];
      const result = await runCli(['install', '--role', user], { DATABASE_URL: database.url });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.include(`--role ${user} is a superuser`);
    });
  });

  describe('with a grace on the revoked column', () => {
    const database = useTestDatabase('role grace');
    const roleName = useRoles(database);

    it('grants what recording revocation times needs, and the daemon keeps then purges a token', async function () {
      this.timeout(60_000);
      await createReferenceSchema(database.current, { passwordResetsTable: null });
      const role = roleName('grace');
      const environment = {
        PASSWORD_RESETS_TABLE: 'none',
        REFRESH_TOKEN_REVOKED_GRACE: '2s',
      };
      succeeded(
        await runCli(['install', '--role', role], {
          ...environment,
          DATABASE_URL: database.url,
        }),
      );
      expect(await privilegesOf(database, role)).to.deep.equal([
        `database ${database.name} CONNECT`,
        'schema public USAGE',
        'schema token_reaper USAGE',
        'table refresh_tokens DELETE',
        'table refresh_tokens SELECT',
        'table token_reaper.revocations DELETE',
        'table token_reaper.revocations INSERT',
        'table token_reaper.revocations SELECT',
        'table token_reaper.sweep_positions DELETE',
        'table token_reaper.sweep_positions INSERT',
        'table token_reaper.sweep_positions SELECT',
        'table token_reaper.sweep_positions UPDATE',
      ]);
      await giveLogin(database, role);

      const daemon = spawnDaemon(['start'], {
        ...environment,
        DATABASE_URL: urlAs(database.url, role),
        LOG_LEVEL: 'debug',
      });
      await daemon.waitForLog('listener.caught_up');
      const ids = await liveTokens(database, 'refresh_tokens', 1);
      await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [ids[0]]);
      expect(await daemon.waitForLog('purge.recorded')).to.include({ recorded: 1 });
      await waitFor(async () => (await remaining(database, 'refresh_tokens', ids)) === 0, {
        timeoutMs: 20_000,
        message: 'the revoked token to go once its grace has passed',
      });
      daemon.signal('SIGUSR1');
      await daemon.waitForLog('sweep.finished');
      await stopDaemon(daemon);
      expectNoFailures(daemon.logs);
    });
  });

  describe('on a table partitioned some other way', () => {
    const database = useTestDatabase('role hash partitions');
    const roleName = useRoles(database);

    it('grants on every leaf, which the sweep and the catch-up delete from, and no membership', async function () {
      this.timeout(60_000);
      await database.query(
        `CREATE TABLE refresh_tokens (id uuid NOT NULL DEFAULT gen_random_uuid(),
           user_id uuid NOT NULL, token_hash text NOT NULL, revoked boolean NOT NULL DEFAULT false,
           expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
           PRIMARY KEY (id)) PARTITION BY HASH (id)`,
      );
      for (let remainder = 0; remainder < 3; remainder += 1) {
        await database.query(
          `CREATE TABLE refresh_tokens_h${remainder} PARTITION OF refresh_tokens
           FOR VALUES WITH (MODULUS 3, REMAINDER ${remainder})`,
        );
      }
      const role = roleName('hash');
      const environment = { PASSWORD_RESETS_TABLE: 'none' };
      succeeded(
        await runCli(['install', '--role', role], { ...environment, DATABASE_URL: database.url }),
      );
      expect(await privilegesOf(database, role)).to.deep.equal([
        `database ${database.name} CONNECT`,
        'schema public USAGE',
        'schema token_reaper USAGE',
        'table refresh_tokens DELETE',
        'table refresh_tokens SELECT',
        'table refresh_tokens_h0 DELETE',
        'table refresh_tokens_h0 SELECT',
        'table refresh_tokens_h1 DELETE',
        'table refresh_tokens_h1 SELECT',
        'table refresh_tokens_h2 DELETE',
        'table refresh_tokens_h2 SELECT',
        'table token_reaper.sweep_positions DELETE',
        'table token_reaper.sweep_positions INSERT',
        'table token_reaper.sweep_positions SELECT',
        'table token_reaper.sweep_positions UPDATE',
      ]);
      await giveLogin(database, role);
      const roleEnvironment = {
        ...environment,
        DATABASE_URL: urlAs(database.url, role),
        LOG_LEVEL: 'debug',
      };

      await insertRandomRows(database.current, { table: 'refresh_tokens', count: 3_000 });
      const daemon = spawnDaemon(['start'], roleEnvironment);
      const caughtUp = await daemon.waitForLog('listener.caught_up');
      expect(caughtUp['deleted']).to.be.greaterThan(0);
      await stopDaemon(daemon);
      expectNoFailures(daemon.logs);

      const sweep = succeeded(await runCli(['sweep'], roleEnvironment));
      expect(
        sweep.logs.find((line) => line.event === 'sweep.finished')?.['deleted'],
      ).to.be.greaterThan(0);
      expectNoFailures(sweep.logs);
      expect(
        await deadCount(database.current, { table: 'refresh_tokens', kind: 'refresh_tokens' }),
      ).to.equal(0);
    });
  });

  describe('on a table partitioned by expiry', () => {
    const database = useTestDatabase('role partitions');
    const roleName = useRoles(database);
    const table = 'auth.refresh_tokens';
    let owner: string;
    let role: string;
    let roleUrl: string;
    let install: CliResult;
    let environment: Record<string, string>;

    before(async function () {
      this.timeout(60_000);
      owner = roleName('owner');
      role = roleName('daemon');
      // The auth service's own role owns the schema, the table and its partitions.
      await database.query(`CREATE ROLE ${pg.escapeIdentifier(owner)} NOLOGIN`);
      await database.query(`CREATE SCHEMA auth AUTHORIZATION ${pg.escapeIdentifier(owner)}`);
      await createPartitionedTable(database.current, 'auth', { owner, fromDay: -5, toDay: 4 });
      await insertSpreadRows(database, table, { rows: 5_000, pastDays: 5, futureDays: 3 });
      environment = { REFRESH_TOKENS_TABLE: table, PASSWORD_RESETS_TABLE: 'none' };
      install = succeeded(
        await runCli(['install', '--role', role], { ...environment, DATABASE_URL: database.url }),
      );
      await giveLogin(database, role);
      roleUrl = urlAs(database.url, role);
    });

    it('makes the role a member of the owner, and says so loudly in the log and the SQL', async () => {
      expect(await privilegesOf(database, role)).to.include(`member of ${owner}`);
      const warning = install.logs.find((line) => line.event === 'install.role_owner_membership');
      expect(warning).to.include({ level: 'warn', role, owner, table });
      const printed = succeeded(
        await runCli(['install', '--role', role, '--print'], {
          ...environment,
          DATABASE_URL: database.url,
        }),
      );
      expect(printed.stdout).to.include("-- !!! MEMBERSHIP IN THE TABLE'S OWNER");
      expect(printed.stdout).to.include(
        `GRANT ${pg.escapeIdentifier(owner)} TO ${pg.escapeIdentifier(role)}`,
      );
      // Every leaf gets SELECT and DELETE of its own.
      const leaves = await partitionsOf(database.current, table);
      for (const leaf of leaves) {
        expect(printed.stdout).to.include(`ON TABLE "auth".${pg.escapeIdentifier(leaf)} TO`);
      }
    });

    it('runs the daemon as the role: drops the expired days, makes days ahead, twice, and purges', async function () {
      this.timeout(90_000);
      const before = await partitionsOf(database.current, table);
      const expired = before.filter((name) => dayOffset(name)! < 0);
      expect(expired).to.have.length(5);

      const daemon = spawnDaemon(['start'], {
        ...environment,
        DATABASE_URL: roleUrl,
        LOG_LEVEL: 'debug',
      });
      await daemon.waitForLog('listener.caught_up');
      const [id] = await liveTokens(database, table, 1);
      await database.query(`UPDATE ${table} SET revoked = true WHERE id = $1`, [id]);
      await daemon.waitForLog((line) => line.event === 'purge.batch' && line['deleted'] === 1);

      let since = daemon.logs.length;
      daemon.signal('SIGUSR1');
      const first = await daemon.waitForLog('sweep.finished', 30_000, since);
      const partitions = (first['tables'] as Record<string, { partitions: PartitionReport }>)[
        table
      ]!.partitions;
      expect(partitions.partitionsDropped).to.equal(5);
      expect(partitions.partitionsSkipped).to.deep.equal([]);
      expect(partitions.partitionsCreated.length).to.be.greaterThan(0);
      const after = await partitionsOf(database.current, table);
      expect(after.filter((name) => expired.includes(name))).to.deep.equal([]);
      expect(
        await deadCount(database.current, { table, kind: 'refresh_tokens' }),
        'no dead row is left',
      ).to.equal(0);

      since = daemon.logs.length;
      daemon.signal('SIGUSR1');
      const second = await daemon.waitForLog('sweep.finished', 30_000, since);
      const again = (second['tables'] as Record<string, { partitions: PartitionReport }>)[table]!
        .partitions;
      expect(again).to.include({ partitionsDropped: 0 });
      expect(again.partitionsCreated).to.deep.equal([]);

      await stopDaemon(daemon);
      expectNoFailures(daemon.logs);

      // `token-reaper sweep` as the role, too.
      const sweep = succeeded(
        await runCli(['sweep'], { ...environment, DATABASE_URL: roleUrl, LOG_LEVEL: 'debug' }),
      );
      expectNoFailures(sweep.logs);
    });

    it('leaves the partitions it made owned by the table’s owner, and can drop and detach them later', async () => {
      const owners = await database.query<{ name: string; owner: string }>(
        `SELECT c.relname AS name, pg_get_userbyid(c.relowner) AS owner
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = $1::regclass ORDER BY c.relname`,
        [table],
      );
      const made = owners.filter((row) => dayOffset(row.name)! >= 4);
      expect(made.length).to.be.greaterThan(0);
      expect(new Set(made.map((row) => row.owner))).to.deep.equal(new Set([owner]));
      const older = owners.filter((row) => dayOffset(row.name)! < 4);
      expect(new Set(older.map((row) => row.owner))).to.deep.equal(new Set([owner]));

      // Once their day has passed, a sweep drops (or detaches) them as the role: the statements
      // it would run then, each rolled back.
      await withServerClient(async (client) => {
        for (const statement of [
          `DROP TABLE auth.${pg.escapeIdentifier(made[0]!.name)}`,
          `ALTER TABLE ${table} DETACH PARTITION auth.${pg.escapeIdentifier(made[0]!.name)}`,
          `DROP TABLE auth.${pg.escapeIdentifier(older[0]!.name)}`,
        ]) {
          await client.query('BEGIN');
          await client.query(statement);
          await client.query('ROLLBACK');
        }
      }, roleUrl);
    });

    // The daemon creates each partition as the table's owner (SET LOCAL ROLE, in
    // src/sweep/partitions.ts), so the owner's own migrations (ALTER TABLE … ADD COLUMN
    // recurses into every partition) keep working.
    it('makes partitions the table’s owner owns, so the auth service can still ALTER the table', async () => {
      const owners = await database.query<{ owner: string }>(
        `SELECT DISTINCT pg_get_userbyid(c.relowner) AS owner
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass`,
        [table],
      );
      expect(owners).to.deep.equal([{ owner }]);
      await withServerClient(async (client) => {
        await client.query('BEGIN');
        await client.query(`SET LOCAL ROLE ${pg.escapeIdentifier(owner)}`);
        await client.query(`ALTER TABLE ${table} ADD COLUMN client_id text`);
        await client.query('ROLLBACK');
      }, database.url);
    });

    // Partitions made since the last install already have their indexes from the parent's, and
    // install leaves them be.
    it('runs install --role again after the daemon made partitions, and changes nothing', async () => {
      const before = await privilegesOf(database, role);
      const again = succeeded(
        await runCli(['install', '--role', role], { ...environment, DATABASE_URL: database.url }),
      );
      expect(again.logs.find((line) => line.event === 'install.role_applied')).to.include({
        created: false,
      });
      const leaves = await partitionsOf(database.current, table);
      const after = await privilegesOf(database, role);
      expect(after.filter((privilege) => !before.includes(privilege))).to.deep.equal(
        leaves
          .filter((leaf) => !before.includes(`table auth.${leaf} SELECT`))
          .flatMap((leaf) => [`table auth.${leaf} DELETE`, `table auth.${leaf} SELECT`]),
      );
    });

    it('refuses when a superuser owns the table, before changing anything', async () => {
      await createPartitionedTable(database.current, 'superuser_owned', { fromDay: -1, toDay: 2 });
      const other = roleName('refused');
      const result = await runCli(['install', '--role', other], {
        ...environment,
        REFRESH_TOKENS_TABLE: 'superuser_owned.refresh_tokens',
        DATABASE_URL: database.url,
      });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.match(/owned by \w+, a superuser/);
      expect(result.stderr).to.include(`--role ${other}`);
      expect(
        await database.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [other]),
      ).to.deep.equal([]);
      const trigger = await database.query(
        `SELECT 1 FROM pg_trigger WHERE tgrelid = 'superuser_owned.refresh_tokens'::regclass
           AND NOT tgisinternal`,
      );
      expect(trigger, 'install changed nothing').to.deep.equal([]);
    });
  });

  describe('with a bad role name', () => {
    const environment = { DATABASE_URL: 'postgres://nobody@127.0.0.1:1/nothing' };
    for (const [label, args] of [
      ['a space', ['--role', 'token reaper']],
      ['a quote', ['--role', 'reaper"; DROP TABLE refresh_tokens; --']],
      ['a leading digit', ['--role', '1reaper']],
      ['a reserved pg_ prefix', ['--role', 'pg_reaper']],
      ['an empty name', ['--role=']],
      ['no name at all', ['--role']],
    ] as const) {
      it(`exits 2 naming --role for ${label}, before connecting`, async () => {
        const result = await runCli(['install', ...args], environment);
        expect(result.code, result.stderr).to.equal(2);
        expect(result.stderr).to.include('--role');
        expect(result.stderr.trim().split('\n')).to.have.length(1);
      });
    }
  });
});

interface PartitionReport {
  partitionsDropped: number;
  partitionsCreated: string[];
  partitionsSkipped: string[];
}

async function partitionsOf(database: TestDatabase, table: string) {
  const rows = await database.query<{ name: string }>(
    `SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = $1::regclass ORDER BY c.relname`,
    [table],
  );
  return rows.map((row) => row.name);
}
