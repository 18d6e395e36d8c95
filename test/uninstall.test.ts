// `uninstall` removes every object install made, whatever PURGE_SOURCE says: the revoke
// triggers and their function, the indexes (a partitioned table's with its partitions'), the
// publication and the slot (ending the walsender that holds it), the token_reaper schema.
// `--print` changes nothing, and a second run finds nothing to do.
import { expect } from 'chai';
import pg from 'pg';
import { runCli } from './support/cli.js';
import { databaseUrl, useTestDatabase, withServerClient } from './support/database.js';
import { startEmbeddedServer, type EmbeddedServer } from './support/embedded-server.js';
import { createPartitionedTable, createReferenceSchema } from './support/fixtures.js';
import { finished, holdSlot, readSourceObjects } from './support/source-objects.js';

interface UninstallFinished {
  dropped: string[];
  absent: string[];
}

const NOTHING_LEFT = {
  triggers: [],
  triggerFunction: false,
  publication: null,
  publishedTables: [],
  slots: [],
  schema: false,
  indexes: [],
};

describe('uninstall', () => {
  describe('after install on plain tables', () => {
    const database = useTestDatabase('uninstall');
    let environment: Record<string, string>;
    before(async () => {
      await createReferenceSchema(database.current);
      environment = { DATABASE_URL: database.url };
      finished(await runCli(['install'], environment), 'install.finished');
    });

    it('--print shows the drops and changes nothing', async () => {
      const before = await readSourceObjects(database.pool);
      const printed = await runCli(['uninstall', '--print'], environment);
      expect(printed.code, printed.stderr).to.equal(0);
      expect(printed.stdout).to.include(
        'DROP TRIGGER IF EXISTS "token_reaper_notify_revoked" ON "public"."refresh_tokens";',
      );
      expect(printed.stdout).to.include(
        'DROP INDEX CONCURRENTLY IF EXISTS "public"."refresh_tokens_expires_at_idx";',
      );
      expect(printed.stdout).to.include('DROP SCHEMA IF EXISTS token_reaper CASCADE;');
      expect(printed.stdout).to.include("WHERE slot_name = 'token_reaper'");
      expect(await readSourceObjects(database.pool)).to.deep.equal(before);
      expect(before.indexes).to.have.length(3);
    });

    it('leaves no trigger, function, index or schema', async () => {
      const result = finished<UninstallFinished>(
        await runCli(['uninstall'], environment),
        'uninstall.finished',
      );
      expect(result.dropped).to.deep.equal([
        'drop revoke trigger',
        'drop index public.refresh_tokens_expires_at_idx',
        'drop index public.refresh_tokens_revoked_idx',
        'drop index public.password_resets_expires_at_idx',
        'drop schema token_reaper',
      ]);
      expect(await readSourceObjects(database.pool)).to.deep.equal(NOTHING_LEFT);
      // The auth service's tables and their own indexes stay.
      const left = await database.query(
        `SELECT indexname FROM pg_indexes WHERE tablename = 'refresh_tokens' ORDER BY 1`,
      );
      expect(left.map((row) => row.indexname)).to.deep.equal([
        'refresh_tokens_pkey',
        'refresh_tokens_token_hash_key',
      ]);
    });

    it('runs again, finds nothing, and exits 0', async () => {
      const result = finished<UninstallFinished>(
        await runCli(['uninstall'], environment),
        'uninstall.finished',
      );
      expect(result.dropped).to.deep.equal([]);
    });

    it('and install puts everything back', async () => {
      finished(await runCli(['install'], environment), 'install.finished');
      const objects = await readSourceObjects(database.pool);
      expect(objects.triggers).to.deep.equal(['refresh_tokens']);
      expect(objects.indexes).to.have.length(3);
    });
  });

  describe('after install on a table partitioned by expiry', () => {
    const database = useTestDatabase('uninstall partitions');

    it('drops the parent’s indexes, and the partitions’ go with them', async () => {
      await createPartitionedTable(database.current, 'auth', { fromDay: -2, toDay: 3 });
      // Without the indexes the schema file ships, so that install builds them on each partition.
      await database.query(
        'DROP INDEX auth.refresh_tokens_expires_at_idx, auth.refresh_tokens_revoked_idx',
      );
      const environment = {
        DATABASE_URL: database.url,
        REFRESH_TOKENS_TABLE: 'auth.refresh_tokens',
        PASSWORD_RESETS_TABLE: 'none',
      };
      finished(await runCli(['install'], environment), 'install.finished');
      const installed = await readSourceObjects(database.pool);
      expect(installed.indexes.length).to.be.greaterThan(2 * 5);
      expect(installed.triggers).to.deep.equal(['auth.refresh_tokens']);
      const printed = await runCli(['uninstall', '--print'], environment);
      expect(printed.stdout).to.include(
        'BEGIN;\nDROP INDEX IF EXISTS "auth"."refresh_tokens_expires_at_idx";\nCOMMIT;',
      );
      finished(await runCli(['uninstall'], environment), 'uninstall.finished');
      expect(await readSourceObjects(database.pool)).to.deep.equal(NOTHING_LEFT);
      const triggers = await database.query(
        `SELECT tgname FROM pg_trigger WHERE tgname = 'token_reaper_notify_revoked'`,
      );
      expect(triggers).to.deep.equal([]);
    });
  });

  describe('after install under PURGE_SOURCE=wal, whatever PURGE_SOURCE says now', () => {
    let server: EmbeddedServer;
    let url: string;
    let pool: pg.Pool;
    before(async function () {
      this.timeout(120_000);
      server = await startEmbeddedServer({
        persistent: false,
        settings: ['wal_level=logical', 'max_slot_wal_keep_size=1GB'],
      });
      await withServerClient((client) => client.query('CREATE DATABASE auth'), server.url);
      url = databaseUrl('auth', server.url);
      pool = new pg.Pool({ connectionString: url, max: 3 });
      pool.on('error', () => undefined);
      await createReferenceSchema(pool);
    });
    after(async () => {
      await pool?.end();
      await server?.dispose();
    });

    it('ends the walsender, drops the slot and the publication, and the rest', async () => {
      finished(
        await runCli(['install'], { DATABASE_URL: url, PURGE_SOURCE: 'wal' }),
        'install.finished',
      );
      const stream = await holdSlot(url, pool);
      try {
        const result = await runCli(['uninstall'], { DATABASE_URL: url, PURGE_SOURCE: 'poll' });
        const done = finished<UninstallFinished>(result, 'uninstall.finished');
        expect(done.dropped).to.include.members([
          'drop replication slot token_reaper',
          'drop publication token_reaper',
          'drop schema token_reaper',
        ]);
        expect(result.logs.map((line) => line.event)).to.include('install.walsender_terminated');
      } finally {
        await stream.stop();
      }
      expect(await readSourceObjects(pool)).to.deep.equal(NOTHING_LEFT);
      const again = finished<UninstallFinished>(
        await runCli(['uninstall'], { DATABASE_URL: url }),
        'uninstall.finished',
      );
      expect(again.dropped).to.deep.equal([]);
    });
  });
});
