// `install` follows PURGE_SOURCE: notify gets the revoke trigger, wal the publication and the
// replication slot, poll neither; a switch drops what the other source left (a slot that a
// walsender holds too), and a second install changes nothing. wal refuses a server that cannot
// have a slot with exit 2 naming the fix; `install --role` under wal grants REPLICATION.
//
// Logical decoding needs wal_level = logical, which the shared server may not have, so this
// file starts servers of its own.
import { expect } from 'chai';
import pg from 'pg';
import { runCli } from './support/cli.js';
import { databaseUrl, withServerClient } from './support/database.js';
import { startEmbeddedServer, type EmbeddedServer } from './support/embedded-server.js';
import { createReferenceSchema } from './support/fixtures.js';
import { ROLE_PASSWORD, urlAs } from './support/roles.js';
import { finished, holdSlot, readSourceObjects } from './support/source-objects.js';

interface InstallFinished {
  applied: string[];
  unchanged: string[];
}

/** A server of this file's own, with a database holding the reference schema. */
function useServer(settings: readonly string[]) {
  const context = {} as { server: EmbeddedServer; url: string; pool: pg.Pool };
  before(async function () {
    this.timeout(120_000);
    context.server = await startEmbeddedServer({ persistent: false, settings });
    await withServerClient((client) => client.query('CREATE DATABASE auth'), context.server.url);
    context.url = databaseUrl('auth', context.server.url);
    context.pool = new pg.Pool({ connectionString: context.url, max: 3 });
    context.pool.on('error', () => undefined);
    await createReferenceSchema(context.pool);
  });
  after(async () => {
    await context.pool?.end();
    await context.server?.dispose();
  });
  return context;
}

const REFRESH_TOKENS = 'refresh_tokens';

describe('install under each PURGE_SOURCE', () => {
  describe('on a server with wal_level = logical', () => {
    const context = useServer(['wal_level=logical', 'max_slot_wal_keep_size=1GB']);
    const install = (source: string, args: string[] = []) =>
      runCli(['install', ...args], { DATABASE_URL: context.url, PURGE_SOURCE: source });

    it('notify: the revoke trigger and its function, no publication, no slot', async () => {
      finished<InstallFinished>(await install('notify'), 'install.finished');
      const objects = await readSourceObjects(context.pool);
      expect(objects.triggers).to.deep.equal([REFRESH_TOKENS]);
      expect(objects.triggerFunction).to.equal(true);
      expect(objects.publication).to.equal(null);
      expect(objects.slots).to.deep.equal([]);
    });

    it('--print under wal shows the publication, the slot and the drops, and changes nothing', async () => {
      const printed = await install('wal', ['--print']);
      expect(printed.code, printed.stderr).to.equal(0);
      expect(printed.stdout).to.include(
        `CREATE PUBLICATION "token_reaper" FOR TABLE "public"."refresh_tokens" WITH (publish = 'update, insert', publish_via_partition_root = true);`,
      );
      expect(printed.stdout).to.include(
        `PERFORM pg_create_logical_replication_slot('token_reaper', 'pgoutput')`,
      );
      expect(printed.stdout).to.include(
        'DROP TRIGGER IF EXISTS "token_reaper_notify_revoked" ON "public"."refresh_tokens";',
      );
      expect(printed.stdout).to.include('DROP FUNCTION IF EXISTS token_reaper.notify_revoked();');
      expect(printed.stdout).not.to.include('-- 003-revoke-trigger.sql');
      // The publication comes before the slot, which comes before the trigger goes.
      const order = ['CREATE PUBLICATION', 'pg_create_logical_replication_slot', 'DROP TRIGGER'];
      const positions = order.map((text) => printed.stdout.indexOf(text));
      expect(positions).to.deep.equal([...positions].sort((a, b) => a - b));
      const objects = await readSourceObjects(context.pool);
      expect(objects.triggers).to.deep.equal([REFRESH_TOKENS]);
      expect(objects.publication).to.equal(null);
      expect(objects.slots).to.deep.equal([]);
    });

    it('notify → wal: the publication and the slot, then the trigger and its function go', async () => {
      const result = finished<InstallFinished>(await install('wal'), 'install.finished');
      expect(result.applied).to.include.members([
        'publication token_reaper',
        'replication slot token_reaper',
        'drop revoke trigger',
      ]);
      const objects = await readSourceObjects(context.pool);
      expect(objects.triggers).to.deep.equal([]);
      expect(objects.triggerFunction).to.equal(false);
      expect(objects.publication).to.deep.equal({
        insert: true,
        update: true,
        delete: false,
        viaRoot: true,
      });
      // The targets with the prompt purge; password resets have none by default.
      expect(objects.publishedTables).to.deep.equal(['public.refresh_tokens']);
      expect(objects.slots).to.deep.equal(['token_reaper pgoutput']);
      // The partial index on marked rows serves every source.
      expect(objects.indexes).to.include('public.refresh_tokens_revoked_idx');
      const versions = await context.pool.query<{ name: string }>(
        'SELECT name FROM token_reaper.schema_version ORDER BY version',
      );
      expect(versions.rows.map((row) => row.name)).not.to.include.members([
        '002-notify-function.sql',
        '003-revoke-trigger.sql',
      ]);
    });

    it('wal again: changes nothing', async () => {
      const slotBefore = await context.pool.query(
        `SELECT xmin, catalog_xmin::text FROM pg_replication_slots WHERE slot_name = 'token_reaper'`,
      );
      const again = finished<InstallFinished>(await install('wal'), 'install.finished');
      expect(again.applied).to.deep.equal([]);
      const slotAfter = await context.pool.query(
        `SELECT xmin, catalog_xmin::text FROM pg_replication_slots WHERE slot_name = 'token_reaper'`,
      );
      expect(slotAfter.rows).to.deep.equal(slotBefore.rows);
    });

    it('install --role under wal gives the role REPLICATION, and under notify it does not', async () => {
      finished(await install('wal', ['--role', 'reaper_wal']), 'install.finished');
      finished(await install('wal', ['--role', 'reaper_wal']), 'install.finished');
      const roles = await context.pool.query<{ rolname: string; rolreplication: boolean }>(
        `SELECT rolname, rolreplication FROM pg_roles WHERE rolname = 'reaper_wal'`,
      );
      expect(roles.rows).to.deep.equal([{ rolname: 'reaper_wal', rolreplication: true }]);
      const printed = await install('notify', ['--print', '--role', 'reaper_notify']);
      expect(printed.code, printed.stderr).to.equal(0);
      expect(printed.stdout).not.to.include('REPLICATION;');
      expect((await install('wal', ['--print', '--role', 'reaper_notify'])).stdout).to.include(
        'ALTER ROLE "reaper_notify" REPLICATION;',
      );
    });

    it('the role --role made can stream from the slot', async () => {
      await context.pool.query(`ALTER ROLE reaper_wal LOGIN PASSWORD '${ROLE_PASSWORD}'`);
      const stream = await holdSlot(urlAs(context.url, 'reaper_wal'), context.pool);
      await stream.stop();
    });

    it('wal → poll: ends the walsender that holds the slot, drops slot and publication', async () => {
      const stream = await holdSlot(context.url, context.pool);
      try {
        const result = await install('poll');
        const done = finished<InstallFinished>(result, 'install.finished');
        expect(done.applied).to.include.members([
          'drop replication slot token_reaper',
          'drop publication token_reaper',
        ]);
        expect(result.logs.map((line) => line.event)).to.include('install.walsender_terminated');
      } finally {
        await stream.stop();
      }
      const objects = await readSourceObjects(context.pool);
      expect(objects.triggers).to.deep.equal([]);
      expect(objects.publication).to.equal(null);
      expect(objects.slots).to.deep.equal([]);
      expect(objects.indexes).to.include('public.refresh_tokens_revoked_idx');
      const again = finished<InstallFinished>(await install('poll'), 'install.finished');
      expect(again.applied).to.deep.equal([]);
    });

    it('poll → notify: the trigger and its function again, and a second run changes nothing', async () => {
      const result = finished<InstallFinished>(await install('notify'), 'install.finished');
      expect(result.applied).to.deep.equal(['002-notify-function.sql', '003-revoke-trigger.sql']);
      const objects = await readSourceObjects(context.pool);
      expect(objects.triggers).to.deep.equal([REFRESH_TOKENS]);
      expect(objects.triggerFunction).to.equal(true);
      expect(objects.publication).to.equal(null);
      expect(objects.slots).to.deep.equal([]);
      const again = finished<InstallFinished>(await install('notify'), 'install.finished');
      expect(again.applied).to.deep.equal([]);
    });

    it('wal → notify: drops the slot and the publication once the trigger is back', async () => {
      finished(await install('wal'), 'install.finished');
      const result = finished<InstallFinished>(await install('notify'), 'install.finished');
      expect(result.applied).to.deep.equal([
        '002-notify-function.sql',
        '003-revoke-trigger.sql',
        'drop replication slot token_reaper',
        'drop publication token_reaper',
      ]);
      const objects = await readSourceObjects(context.pool);
      expect(objects.triggers).to.deep.equal([REFRESH_TOKENS]);
      expect(objects.publication).to.equal(null);
      expect(objects.slots).to.deep.equal([]);
    });

    it('leaves another database’s slot of the same name alone: wal exits 2 naming PURGE_WAL_SLOT, notify keeps it', async () => {
      await withServerClient(
        (client) =>
          client.query(`SELECT pg_create_logical_replication_slot('token_reaper', 'pgoutput')`),
        context.server.url,
      );
      try {
        const result = await install('wal');
        expect(result.code, result.stderr).to.equal(2);
        expect(result.stderr).to.include('a slot of database postgres');
        expect(result.stderr).to.include('PURGE_WAL_SLOT');
        finished(await install('notify'), 'install.finished');
        const slots = await context.pool.query(`SELECT database FROM pg_replication_slots`);
        expect(slots.rows).to.deep.equal([{ database: 'postgres' }]);
      } finally {
        await withServerClient(
          (client) => client.query(`SELECT pg_drop_replication_slot('token_reaper')`),
          context.server.url,
        );
      }
    });

    it('exits 2 naming REPLICATION when the installing role has none', async () => {
      await context.pool.query(`CREATE ROLE installer LOGIN PASSWORD '${ROLE_PASSWORD}'`);
      const result = await runCli(['install'], {
        DATABASE_URL: urlAs(context.url, 'installer'),
        PURGE_SOURCE: 'wal',
      });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.include('REPLICATION');
      expect(result.stderr).to.include('ALTER ROLE "installer" REPLICATION;');
    });
  });

  describe('on a server with max_slot_wal_keep_size = -1 (unbounded)', () => {
    const context = useServer(['wal_level=logical', 'max_slot_wal_keep_size=-1']);

    it('wal exits 2 naming max_slot_wal_keep_size, and changes nothing', async () => {
      const result = await runCli(['install'], { DATABASE_URL: context.url, PURGE_SOURCE: 'wal' });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.include('max_slot_wal_keep_size');
      expect(result.stderr).not.to.include('wal_level');
      expect((await readSourceObjects(context.pool)).schema).to.equal(false);
    });
  });

  describe('on a server with wal_level = replica', () => {
    const context = useServer(['wal_level=replica']);

    it('wal exits 2, says to set wal_level = logical, and changes nothing', async () => {
      const result = await runCli(['install'], { DATABASE_URL: context.url, PURGE_SOURCE: 'wal' });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr).to.include('wal_level');
      expect(result.stderr).to.include('ALTER SYSTEM SET wal_level = logical');
      const objects = await readSourceObjects(context.pool);
      expect(objects.schema).to.equal(false);
      expect(objects.publication).to.equal(null);
    });

    it('poll needs none of it', async () => {
      const result = await runCli(['install'], { DATABASE_URL: context.url, PURGE_SOURCE: 'poll' });
      finished(result, 'install.finished');
      const objects = await readSourceObjects(context.pool);
      expect(objects.triggers).to.deep.equal([]);
      expect(objects.triggerFunction).to.equal(false);
      expect(objects.indexes).to.include('public.refresh_tokens_revoked_idx');
    });
  });
});
