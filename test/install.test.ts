// `install` on a real PostgreSQL: idempotent, safe when two installers race, `--print` shows
// exactly what it runs, and the trigger it installs notifies the way the listener expects.
import { expect } from 'chai';
import pg from 'pg';
import { runCli, waitFor } from './support/cli.js';
import { useTestDatabase, type TestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';
import { ALL_SQL_FILES } from './support/sql-files.js';
import { writeTargetsFile } from './support/targets.js';
import { truncateName } from '../src/install.js';

const ALL_FILES: readonly string[] = ALL_SQL_FILES;

function installFinished(result: Awaited<ReturnType<typeof runCli>>) {
  expect(result.code, result.stderr + result.stdout).to.equal(0);
  const line = result.logs.find((candidate) => candidate.event === 'install.finished');
  expect(line, result.stdout).not.to.equal(undefined);
  return line as unknown as { applied: string[]; unchanged: string[] };
}

async function recordedVersions(database: TestDatabase) {
  const rows = await database.query(
    'SELECT version, name, checksum FROM token_reaper.schema_version ORDER BY version',
  );
  return rows as { version: number; name: string; checksum: string }[];
}

/** Collects NOTIFY payloads on a channel through a connection of its own. */
async function listen(database: TestDatabase, channel: string) {
  const client = new pg.Client({ connectionString: database.url });
  await client.connect();
  const payloads: Record<string, unknown>[] = [];
  client.on('notification', (message) => payloads.push(JSON.parse(message.payload ?? 'null')));
  await client.query(`LISTEN ${pg.escapeIdentifier(channel)}`);
  return { payloads, close: () => client.end() };
}

describe('install', () => {
  describe('on the reference schema', () => {
    const database = useTestDatabase('install');
    let environment: Record<string, string>;
    before(async () => {
      await createReferenceSchema(database.current);
      environment = { DATABASE_URL: database.url };
    });

    it('prints the plan without changing anything', async () => {
      const printed = await runCli(['install', '--print'], environment);
      expect(printed.code, printed.stderr).to.equal(0);
      for (const file of ALL_FILES) expect(printed.stdout).to.include(`-- ${file}`);
      expect(printed.stdout).to.include(
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "refresh_tokens_expires_at_idx"',
      );
      expect(printed.stdout).to.include(
        'WHEN ((NEW."revoked" IS TRUE) <> (OLD."revoked" IS TRUE))',
      );
      const schema = await database.query(`SELECT to_regnamespace('token_reaper') AS oid`);
      expect(schema[0]!.oid).to.equal(null);
    });

    it('races a second installer, and each file is applied exactly once', async () => {
      const [first, second] = await Promise.all([
        runCli(['install'], environment),
        runCli(['install'], environment),
      ]);
      const applied = [
        ...installFinished(first).applied,
        ...installFinished(second).applied,
      ].sort();
      expect(applied).to.deep.equal(ALL_FILES);
      const versions = await recordedVersions(database.current);
      expect(versions.map((row) => row.name)).to.deep.equal(ALL_FILES);
    });

    it('changes nothing when run again', async () => {
      const again = installFinished(await runCli(['install'], environment));
      expect(again.applied).to.deep.equal([]);
      // Under PURGE_SOURCE=notify (the default) there is no slot or publication to drop.
      expect(again.unchanged).to.deep.equal([
        ...ALL_FILES,
        'drop replication slot token_reaper',
        'drop publication token_reaper',
      ]);
    });

    it('records exactly the checksums that --print shows', async () => {
      const printed = await runCli(['install', '--print'], environment);
      for (const row of await recordedVersions(database.current)) {
        expect(printed.stdout).to.include(
          `VALUES (${row.version}, '${row.name}', '${row.checksum}')`,
        );
      }
    });

    it('creates the expiry indexes, the partial revoked index and the trigger', async () => {
      const indexes = await database.query(
        `SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname`,
      );
      const definitions = indexes.map((row) => row.indexdef as string);
      expect(definitions).to.include(
        'CREATE INDEX refresh_tokens_expires_at_idx ON public.refresh_tokens USING btree (expires_at)',
      );
      expect(definitions).to.include(
        'CREATE INDEX refresh_tokens_revoked_idx ON public.refresh_tokens USING btree (id) WHERE revoked',
      );
      expect(definitions).to.include(
        'CREATE INDEX password_resets_expires_at_idx ON public.password_resets USING btree (expires_at)',
      );
      const triggers = await database.query(
        `SELECT tgname FROM pg_trigger WHERE tgrelid = 'public.refresh_tokens'::regclass AND NOT tgisinternal`,
      );
      expect(triggers.map((row) => row.tgname)).to.deep.equal(['token_reaper_notify_revoked']);
    });

    it('notifies a committed revocation with the id and the time, never the token hash', async () => {
      const listener = await listen(database.current, 'refresh_token_revoked');
      try {
        const [rolledBack, committed] = await database.query(
          `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
           VALUES (gen_random_uuid(), 'secret-hash-1', now() + interval '1 day'),
                  (gen_random_uuid(), 'secret-hash-2', now() + interval '1 day')
           RETURNING id::text`,
        );
        const client = await database.current.pool.connect();
        try {
          await client.query('BEGIN');
          await client.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [
            rolledBack!.id,
          ]);
          await client.query('ROLLBACK');
        } finally {
          client.release();
        }
        // Revoking twice notifies once: only the change from not revoked to revoked fires.
        await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [
          committed!.id,
        ]);
        await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [
          committed!.id,
        ]);
        // Notifications arrive in commit order, so once this fence is in, anything the
        // statements above could have sent is in too.
        await database.query(`SELECT pg_notify('refresh_token_revoked', '{"fence":true}')`);
        await waitFor(() => listener.payloads.at(-1)?.fence === true, {
          message: 'the fence notification',
        });
        const [payload, fence] = listener.payloads;
        expect(fence).to.deep.equal({ fence: true });
        expect(listener.payloads).to.have.length(2);
        expect(payload).to.have.keys(['table', 'id', 'revoked_at']);
        expect(payload).to.include({ table: 'public.refresh_tokens', id: committed!.id });
        expect(Number.isNaN(Date.parse(payload!.revoked_at as string))).to.equal(false);
        expect(JSON.stringify(listener.payloads)).not.to.include('secret-hash');
      } finally {
        await listener.close();
      }
    });

    it('refuses a token_reaper schema newer than it knows, with exit 2', async () => {
      await database.query(
        `INSERT INTO token_reaper.schema_version (version, name, checksum) VALUES (999, '999-future.sql', 'x')`,
      );
      try {
        const result = await runCli(['install'], environment);
        expect(result.code).to.equal(2);
        expect(result.stderr).to.match(
          /schema is at version 999, newer than this token-reaper knows \(8\)\. Upgrade token-reaper\./,
        );
      } finally {
        await database.query('DELETE FROM token_reaper.schema_version WHERE version = 999');
      }
    });
  });

  describe('with custom names and timestamp columns', () => {
    const database = useTestDatabase('install_custom');
    /**
     * Leaves an INVALID index of the name install gives the expiry index, as a killed CREATE
     * INDEX CONCURRENTLY does: a unique build over two tokens of the same user fails.
     */
    const leaveInvalidExpiryIndex = async () => {
      await database.query(
        `INSERT INTO auth.sessions (user_id, token_hash, valid_until)
         SELECT '00000000-0000-0000-0000-000000000001', md5(i::text), now() + interval '1 day'
         FROM generate_series(1, 2) i`,
      );
      await database
        .query(
          `CREATE UNIQUE INDEX CONCURRENTLY sessions_valid_until_idx ON auth.sessions (user_id)`,
        )
        .catch(() => undefined);
      const [index] = await database.query(
        `SELECT indisvalid FROM pg_index WHERE indexrelid = 'auth.sessions_valid_until_idx'::regclass`,
      );
      expect(index!.indisvalid).to.equal(false);
    };
    const environment = () => ({
      DATABASE_URL: database.url,
      REFRESH_TOKENS_TABLE: 'auth.sessions',
      REFRESH_TOKENS_ID_COLUMN: 'token_id',
      REFRESH_TOKENS_EXPIRES_AT_COLUMN: 'valid_until',
      REFRESH_TOKEN_NOTIFY_CHANNEL: 'sessions_revoked',
      PASSWORD_RESETS_TABLE: 'none',
    });

    it('renders the trigger and indexes for them, and rebuilds an index left invalid', async () => {
      await database.query(`CREATE SCHEMA auth`);
      await database.query(
        `CREATE TABLE auth.sessions (token_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
           user_id uuid NOT NULL, token_hash text NOT NULL, revoked_at timestamptz,
           valid_until timestamptz NOT NULL)`,
      );
      await leaveInvalidExpiryIndex();

      const result = await runCli(['install'], environment());
      const finished = installFinished(result);
      expect(finished.applied).to.deep.equal(
        ALL_FILES.filter((file) => !file.includes('password-resets')),
      );
      expect(result.logs.some((line) => line.event === 'install.invalid_index')).to.equal(true);
      const indexes = await database.query(
        `SELECT i.indisvalid AS valid, pg_get_indexdef(i.indexrelid) AS definition
         FROM pg_index i WHERE i.indrelid = 'auth.sessions'::regclass AND NOT i.indisprimary
         ORDER BY 2`,
      );
      expect(indexes).to.deep.equal([
        {
          valid: true,
          definition:
            'CREATE INDEX sessions_revoked_at_idx ON auth.sessions USING btree (token_id) WHERE (revoked_at IS NOT NULL)',
        },
        {
          valid: true,
          definition:
            'CREATE INDEX sessions_valid_until_idx ON auth.sessions USING btree (valid_until)',
        },
      ]);

      const listener = await listen(database.current, 'sessions_revoked');
      try {
        const [row] = await database.query(
          `UPDATE auth.sessions SET revoked_at = now()
           WHERE token_id = (SELECT token_id FROM auth.sessions LIMIT 1) RETURNING token_id::text AS id`,
        );
        await waitFor(() => listener.payloads.length > 0, { message: 'the revoke notification' });
        expect(listener.payloads[0]).to.include({ table: 'auth.sessions', id: row!.id });
      } finally {
        await listener.close();
      }
    });

    it("refuses index names that the table's predecessor still holds, and builds the indexes once they are free", async () => {
      // A migration that rebuilds the table: the old one renamed, keeping its indexes' names.
      await database.query(`ALTER TABLE auth.sessions RENAME TO sessions_before`);
      await database.query(
        `CREATE TABLE auth.sessions (token_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
           user_id uuid NOT NULL, token_hash text NOT NULL, revoked_at timestamptz,
           valid_until timestamptz NOT NULL)`,
      );

      const explained = await runCli(['explain', '--json'], environment());
      expect(explained.code, explained.stderr).to.equal(0);
      const [target] = (
        JSON.parse(explained.stdout) as {
          targets: { indexes: { name: string; present: boolean; problem: string | null }[] }[];
        }
      ).targets;
      expect(target!.indexes).to.deep.include({
        name: 'sessions_valid_until_idx',
        present: false,
        problem: 'its name is taken by the index of auth.sessions_before',
      });

      const refused = await runCli(['install'], environment());
      expect(refused.code, refused.stdout).to.equal(2);
      expect(refused.stderr).to.include(
        'install names the index on "auth"."sessions" "auth"."sessions_valid_until_idx", but that name is taken by the index of auth.sessions_before',
      );
      const built = await database.query(
        `SELECT count(*)::int AS count FROM pg_index WHERE indrelid = 'auth.sessions'::regclass`,
      );
      expect(built[0]!.count).to.equal(1); // the primary key alone

      await database.query(
        `ALTER INDEX auth.sessions_valid_until_idx RENAME TO sessions_before_valid_until_idx`,
      );
      await database.query(
        `ALTER INDEX auth.sessions_revoked_at_idx RENAME TO sessions_before_revoked_at_idx`,
      );
      const finished = installFinished(await runCli(['install'], environment()));
      expect(finished.applied).to.include.members(['004-expiry-index.sql', '005-marker-index.sql']);
      const indexes = await database.query(
        `SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'auth.sessions'::regclass AND NOT i.indisprimary ORDER BY 1`,
      );
      expect(indexes).to.deep.equal([
        { name: 'sessions_revoked_at_idx', valid: true },
        { name: 'sessions_valid_until_idx', valid: true },
      ]);

      // A recorded step whose index is now invalid (an interrupted uninstall leaves one): install
      // rebuilds it rather than calling the step unchanged.
      await database.query(`DROP INDEX auth.sessions_valid_until_idx`);
      await leaveInvalidExpiryIndex();
      const invalid = JSON.parse((await runCli(['explain', '--json'], environment())).stdout) as {
        targets: { indexes: { name: string; problem: string | null }[] }[];
      };
      expect(invalid.targets[0]!.indexes).to.deep.include({
        name: 'sessions_valid_until_idx',
        present: false,
        problem: 'invalid, left by an interrupted build',
      });
      const rebuilt = installFinished(await runCli(['install'], environment()));
      expect(rebuilt.applied).to.deep.equal(['004-expiry-index.sql']);
      const definition = await database.query(
        `SELECT i.indisvalid AS valid, pg_get_indexdef(i.indexrelid) AS definition
         FROM pg_index i WHERE i.indexrelid = 'auth.sessions_valid_until_idx'::regclass`,
      );
      expect(definition).to.deep.equal([
        {
          valid: true,
          definition:
            'CREATE INDEX sessions_valid_until_idx ON auth.sessions USING btree (valid_until)',
        },
      ]);
    });
  });

  describe('names', () => {
    const database = useTestDatabase('install_names');

    it('cuts a long name where PostgreSQL does, never inside a character', async () => {
      // Random names of one- to four-byte characters, around the 63-byte limit.
      const characters = ['a', '_', 'é', 'ß', 'ü', '€', '語', 'ノ', '😀', '𝄞'];
      const names = Array.from({ length: 300 }, () =>
        Array.from(
          { length: 20 + Math.floor(Math.random() * 50) },
          () => characters[Math.floor(Math.random() * characters.length)]!,
        ).join(''),
      );
      const rows = await database.query<{ kept: string }>(
        'SELECT name::text AS kept FROM unnest($1::name[]) WITH ORDINALITY AS given (name, n) ORDER BY n',
        [names],
      );
      expect(names.map((name) => truncateName(name))).to.deep.equal(rows.map((row) => row.kept));
      expect(names.some((name) => Buffer.byteLength(name) > 63)).to.equal(true);
    });
  });

  describe('when the refresh-token table is no longer the same', () => {
    const database = useTestDatabase('install_moved');
    const triggers = async () =>
      (
        await database.query(
          `SELECT tgrelid::regclass::text AS table FROM pg_trigger
           WHERE tgname = 'token_reaper_notify_revoked' AND tgparentid = 0 ORDER BY 1`,
        )
      ).map((row) => row.table as string);

    it('drops the revoke trigger of a table it no longer purges, and keeps the others', async () => {
      await createReferenceSchema(database.current);
      await createReferenceSchema(database.current, {
        refreshTokensTable: 'rotated_tokens',
        passwordResetsTable: null,
      });
      installFinished(await runCli(['install'], { DATABASE_URL: database.url }));
      expect(await triggers()).to.deep.equal(['refresh_tokens']);

      // The configuration moves on: a trigger left on the old table would go on notifying,
      // and holding the auth service's revoking commits in line, for no one.
      const moved = { DATABASE_URL: database.url, REFRESH_TOKENS_TABLE: 'rotated_tokens' };
      const printed = await runCli(['install', '--print'], moved);
      expect(printed.code, printed.stderr).to.equal(0);
      expect(printed.stdout).to.include(
        '-- drop revoke trigger on public.refresh_tokens: no longer purged promptly\nBEGIN;\n' +
          'DROP TRIGGER IF EXISTS "token_reaper_notify_revoked" ON "public"."refresh_tokens";',
      );
      expect(printed.stdout).not.to.include('DROP FUNCTION');
      expect(await triggers()).to.deep.equal(['refresh_tokens']);

      const finished = installFinished(await runCli(['install'], moved));
      expect(finished.applied).to.include('drop revoke trigger on public.refresh_tokens');
      expect(await triggers()).to.deep.equal(['rotated_tokens']);
      const [revokeFunction] = await database.query(
        `SELECT to_regprocedure('token_reaper.notify_revoked()') IS NOT NULL AS present`,
      );
      expect(revokeFunction!.present).to.equal(true);
      expect(installFinished(await runCli(['install'], moved)).applied).to.deep.equal([]);

      // No table purged promptly at all: the triggers go, the function stays, so that the
      // recorded file that made it still tells the truth when a prompt target comes back.
      const targets = await writeTargetsFile({
        targets: [{ table: 'rotated_tokens', expiry: { column: 'expires_at' }, notify: false }],
      });
      const none = ['--config', targets.path];
      const environment = { DATABASE_URL: database.url };
      const printedNone = await runCli(['install', '--print', ...none], environment);
      expect(printedNone.code, printedNone.stderr).to.equal(0);
      expect(printedNone.stdout).to.include('-- drop revoke trigger on public.rotated_tokens');
      expect(printedNone.stdout).not.to.include('DROP FUNCTION');
      const dropped = installFinished(await runCli(['install', ...none], environment));
      await targets.remove();
      expect(dropped.applied).to.include('drop revoke trigger on public.rotated_tokens');
      expect(await triggers()).to.deep.equal([]);
      const [kept] = await database.query(
        `SELECT to_regprocedure('token_reaper.notify_revoked()') IS NOT NULL AS present`,
      );
      expect(kept!.present).to.equal(true);
      installFinished(await runCli(['install'], moved));
      expect(await triggers()).to.deep.equal(['rotated_tokens']);
    });
  });
});
