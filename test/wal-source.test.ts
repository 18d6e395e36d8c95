// PURGE_SOURCE=wal end to end, on a PostgreSQL of its own with wal_level=logical: the
// daemon streams the token table's changes from a logical replication slot and deletes each
// revocation, and the slot's guarantees hold through what a daemon lives through: a rollback,
// an un-revoke, a kill of 30 s, a slot the server gave up, and a second daemon beside it.
import { setTimeout as delay } from 'node:timers/promises';
import { expect } from 'chai';
import pg from 'pg';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import {
  startLogicalServer,
  startOwnedServer,
  type LogicalServer,
  type OwnedServer,
} from './support/database.js';
import { findFreePort } from './support/embedded-server.js';
import { createReferenceSchema, revokeThenUndo } from './support/fixtures.js';
import { createPgoutputDecoder } from '../src/purge/sources/pgoutput.js';

interface WalDatabase {
  readonly url: string;
  readonly slot: string;
  readonly environment: Record<string, string>;
  query(text: string, parameters?: unknown[]): Promise<Record<string, unknown>[]>;
  /** Live tokens, inserted in one transaction; returns their ids. */
  tokens(count: number): Promise<string[]>;
  /** How many of these ids are still in the table. */
  remaining(ids: readonly string[]): Promise<number>;
  end(): Promise<void>;
}

let databases = 0;

/** A database with the reference schema, installed for `wal` with a slot of its own. */
async function walDatabase(server: Pick<LogicalServer, 'url'>): Promise<WalDatabase> {
  databases += 1;
  const name = `wal_${databases}`;
  const slot = `token_reaper_${name}`;
  const admin = new pg.Client({ connectionString: server.url });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = new URL(server.url);
  url.pathname = `/${name}`;
  const client = new pg.Client({ connectionString: url.toString() });
  await client.connect();
  await createReferenceSchema(client, { passwordResetsTable: null });
  const environment = {
    DATABASE_URL: url.toString(),
    PASSWORD_RESETS_TABLE: 'none',
    PURGE_SOURCE: 'wal',
    PURGE_WAL_SLOT: slot,
  };
  const install = await runCli(['install'], environment);
  expect(install.code, install.stderr + install.stdout).to.equal(0);
  const query = async (text: string, parameters?: unknown[]) =>
    (await client.query(text, parameters)).rows as Record<string, unknown>[];
  return {
    url: url.toString(),
    slot,
    environment,
    query,
    async tokens(count) {
      const rows = await query(
        `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
         SELECT gen_random_uuid(), md5(random()::text || i), now() + interval '1 day'
         FROM generate_series(1, $1) i RETURNING id::text`,
        [count],
      );
      return rows.map((row) => row.id as string);
    },
    async remaining(ids) {
      const rows = await query(
        'SELECT count(*)::int AS count FROM refresh_tokens WHERE id = ANY($1::uuid[])',
        [ids],
      );
      return rows[0]!.count as number;
    },
    async end() {
      // A slot left behind would keep the server's WAL; the next test's database has its own.
      await query(
        'SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active',
        [slot],
      ).catch(() => undefined);
      await client.end();
    },
  };
}

function revoke(database: WalDatabase, ids: readonly string[]) {
  return database.query('UPDATE refresh_tokens SET revoked = true WHERE id = ANY($1::uuid[])', [
    ids,
  ]);
}

function allGone(database: WalDatabase, ids: readonly string[], timeoutMs = 15_000) {
  return waitFor(async () => (await database.remaining(ids)) === 0, {
    timeoutMs,
    message: `${ids.length} revoked tokens to be purged from the slot`,
  });
}

async function startWalDaemon(
  database: WalDatabase,
  extra: Record<string, string> = {},
): Promise<ProcessHandle> {
  const daemon = spawnDaemon(['start'], { ...database.environment, ...extra });
  await daemon.waitForLog((line) => line.event === 'wal.connected' || line.event === 'wal.waiting');
  return daemon;
}

async function stopDaemon(daemon: ProcessHandle) {
  daemon.signal('SIGTERM');
  expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
}

/**
 * Rows the daemon deleted, from its log: by its purge batches, and by catch-ups (every start
 * runs one, which may meet a revocation before its batch does).
 */
function purged(daemon: ProcessHandle) {
  return daemon.logs
    .filter((line) => line.event === 'purge.batch' || line.event === 'listener.caught_up')
    .reduce((sum, line) => sum + (line.deleted as number), 0);
}

/** Waits until the daemon has logged `rows` deletions (a line follows its commit). */
function loggedPurges(daemon: ProcessHandle, rows: number) {
  return waitFor(() => purged(daemon) >= rows, {
    timeoutMs: 10_000,
    message: `${rows} deletions in the purge.batch lines`,
  });
}

describe('PURGE_SOURCE=wal', function () {
  this.timeout(180_000);
  let server: LogicalServer;

  before(async () => {
    server = await startLogicalServer();
    console.error(`    on ${server.source}`);
  });
  after(async () => {
    await server?.dispose();
  });

  describe('one daemon', () => {
    let database: WalDatabase;
    let daemon: ProcessHandle;
    let metricsPort: number;
    before(async () => {
      database = await walDatabase(server);
      metricsPort = await findFreePort();
      // A warning threshold of one byte: any slot is past it.
      daemon = await startWalDaemon(database, {
        METRICS_PORT: String(metricsPort),
        METRICS_HOST: '127.0.0.1',
        PURGE_WAL_LAG_WARNING: '1B',
      });
    });
    after(async () => {
      if (daemon) await stopDaemon(daemon);
      await database?.end();
    });

    it('purges a revocation, and says in daemon.started that wal is the source', async () => {
      const [revoked, live] = await database.tokens(2);
      await revoke(database, [revoked!]);
      await allGone(database, [revoked!]);
      expect(await database.remaining([live!])).to.equal(1);
      const started = daemon.logs.find((line) => line.event === 'daemon.started');
      expect(started?.source).to.equal('wal');
      const batch = daemon.logs.find((line) => line.event === 'purge.batch');
      expect(batch?.deleted).to.equal(1);
    });

    it('purges a row inserted already revoked', async () => {
      const rows = await database.query(
        `INSERT INTO refresh_tokens (user_id, token_hash, expires_at, revoked)
         VALUES (gen_random_uuid(), md5(random()::text), now() + interval '1 day', true)
         RETURNING id::text`,
      );
      await allGone(database, [rows[0]!.id as string]);
    });

    it('keeps a revocation that was rolled back, and a token revoked and restored in one transaction', async () => {
      const [rolledBack, restored, marker] = await database.tokens(3);
      const client = new pg.Client({ connectionString: database.url });
      await client.connect();
      try {
        await revokeThenUndo(client, rolledBack!, restored!);
      } finally {
        await client.end();
      }
      // A later revocation is decoded after both; once it is gone, they have been seen.
      await revoke(database, [marker!]);
      await allGone(database, [marker!]);
      expect(await database.remaining([rolledBack!, restored!])).to.equal(2);
    });

    it('reports the WAL the slot keeps: wal.lag past the threshold, the gauge in /metrics, and explain', async () => {
      const warning = await daemon.waitForLog('wal.lag');
      expect(warning.slot).to.equal(database.slot);
      expect(warning.retainedBytes).to.be.a('number').above(0);
      expect(warning.thresholdBytes).to.equal(1);
      const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
      expect(metrics).to.match(
        new RegExp(`^token_reaper_wal_slot_retained_bytes\\{slot="${database.slot}"\\} \\d+$`, 'm'),
      );
      const explained = await runCli(['explain', '--json'], database.environment);
      expect(explained.code, explained.stderr).to.equal(0);
      const source = (JSON.parse(explained.stdout) as { source: Record<string, unknown> }).source;
      expect(source.name).to.equal('wal');
      expect(source.summary).to.include('streaming');
      expect(source.slot).to.include({
        name: database.slot,
        exists: true,
        active: true,
        publication: true,
      });
    });

    it('acknowledges what it deleted: the slot’s confirmed position moves past the revocations', async () => {
      const [token] = await database.tokens(1);
      await revoke(database, [token!]);
      const [{ lsn }] = (await database.query('SELECT pg_current_wal_lsn()::text AS lsn')) as [
        { lsn: string },
      ];
      await allGone(database, [token!]);
      await waitFor(
        async () => {
          const rows = await database.query(
            'SELECT confirmed_flush_lsn >= $2::pg_lsn AS past FROM pg_replication_slots WHERE slot_name = $1',
            [database.slot, lsn],
          );
          return rows[0]?.past === true;
        },
        { timeoutMs: 10_000, message: 'the slot to confirm the revocation’s position' },
      );
    });
  });

  it('keeps a token revoked and restored while the daemon was away, and purges what stayed revoked, from the slot alone', async () => {
    const database = await walDatabase(server);
    try {
      let daemon = await startWalDaemon(database);
      await stopDaemon(daemon);
      const [restored, revoked] = await database.tokens(2);
      await revoke(database, [restored!, revoked!]);
      await database.query('UPDATE refresh_tokens SET revoked = false WHERE id = $1', [restored]);
      daemon = await startWalDaemon(database);
      await allGone(database, [revoked!]);
      expect(await database.remaining([restored!])).to.equal(1);
      await stopDaemon(daemon);
    } finally {
      await database.end();
    }
  });

  it('after a kill of 30 s, purges every revocation made meanwhile from the slot, with no catch-up scan', async () => {
    const database = await walDatabase(server);
    try {
      const first = await startWalDaemon(database);
      first.signal('SIGKILL');
      await first.exited;
      // 30 s of revocations, five a second, while no daemon runs. The pause paces the
      // workload; nothing waits on it.
      const revoked: string[] = [];
      const until = performance.now() + 30_000;
      while (performance.now() < until) {
        const ids = await database.tokens(5);
        await revoke(database, ids);
        revoked.push(...ids);
        await delay(1_000);
      }
      const live = await database.tokens(10);
      const second = await startWalDaemon(database);
      await allGone(database, revoked, 30_000);
      expect(await database.remaining(live)).to.equal(live.length);
      await loggedPurges(second, revoked.length);
      expect(purged(second)).to.equal(revoked.length);
      // The slot held them all: the catch-up every start runs, once the stream has settled
      // past the WAL's end at the start, finds nothing left.
      const caughtUp = await second.waitForLog('listener.caught_up');
      expect(caughtUp).to.include({ reason: 'connected', deleted: 0 });
      await stopDaemon(second);
    } finally {
      await database.end();
    }
  });

  it('recreates a slot the server invalidated, and catches up what it missed', async () => {
    const database = await walDatabase(server);
    try {
      const daemon = await startWalDaemon(database);
      await stopDaemon(daemon);
      const revoked = await database.tokens(20);
      await revoke(database, revoked);
      await database.query(`ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'`);
      await database.query('SELECT pg_reload_conf()');
      try {
        // WAL past the bound, then a checkpoint: the server gives up the slot.
        await waitFor(
          async () => {
            for (let segment = 0; segment < 3; segment += 1) {
              await database.query(`CREATE TEMP TABLE IF NOT EXISTS filler (x int)`);
              await database.query(`INSERT INTO filler SELECT generate_series(1, 1000)`);
              await database.query('SELECT pg_switch_wal()');
            }
            await database.query('CHECKPOINT');
            const rows = await database.query(
              'SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1',
              [database.slot],
            );
            return rows[0]?.wal_status === 'lost';
          },
          { timeoutMs: 60_000, message: 'the slot to be invalidated' },
        );
      } finally {
        await database.query('ALTER SYSTEM RESET max_slot_wal_keep_size');
        await database.query('SELECT pg_reload_conf()');
      }
      const restarted = await startWalDaemon(database);
      await restarted.waitForLog('wal.slot_recreated');
      await allGone(database, revoked);
      const caughtUp = await restarted.waitForLog('listener.caught_up');
      expect(caughtUp.reason).to.equal('slot_created');
      // And the new slot streams.
      const [next] = await database.tokens(1);
      await revoke(database, [next!]);
      await allGone(database, [next!]);
      await stopDaemon(restarted);
    } finally {
      await database.end();
    }
  });

  it('lets one of two daemons consume the slot; the other stands by and takes over', async () => {
    const database = await walDatabase(server);
    try {
      const first = await startWalDaemon(database);
      await first.waitForLog('wal.connected');
      const second = await startWalDaemon(database);
      await second.waitForLog('wal.waiting');
      const before = await database.tokens(10);
      await revoke(database, before);
      await allGone(database, before);
      await loggedPurges(first, 10);
      expect(purged(first)).to.equal(10);
      expect(purged(second)).to.equal(0);
      const walsenders = await database.query(
        `SELECT count(*)::int AS count FROM pg_replication_slots WHERE slot_name = $1 AND active`,
        [database.slot],
      );
      expect(walsenders[0]!.count).to.equal(1);

      await stopDaemon(first);
      await second.waitForLog('wal.connected', 30_000);
      const after = await database.tokens(10);
      await revoke(database, after);
      await allGone(database, after);
      await loggedPurges(second, 10);
      expect(purged(second)).to.equal(10);
      await stopDaemon(second);
    } finally {
      await database.end();
    }
  });

  it('keeps one stream open for as long as it runs, past any query timeout', async () => {
    const database = await walDatabase(server);
    try {
      const daemon = await startWalDaemon(database);
      // Eight seconds of revocations, one a second: each goes, on the same stream.
      const until = performance.now() + 8_000;
      while (performance.now() < until) {
        const [token] = await database.tokens(1);
        await revoke(database, [token!]);
        await allGone(database, [token!]);
        await delay(1_000);
      }
      expect(daemon.logs.filter((line) => line.event === 'wal.connected')).to.have.length(1);
      expect(
        daemon.logs.filter((line) => line.event.startsWith('wal.') && line.level !== 'info'),
      ).to.deep.equal([]);
      await stopDaemon(daemon);
    } finally {
      await database.end();
    }
  });

  it('makes a missing slot however long a transaction delays it, then catches up what came before', async () => {
    const database = await walDatabase(server);
    const holder = new pg.Client({ connectionString: database.url });
    await holder.connect();
    try {
      await database.query('SELECT pg_drop_replication_slot($1)', [database.slot]);
      const [before] = await database.tokens(1);
      await revoke(database, [before!]);
      // A transaction with an xid: making a slot waits for it to end.
      await holder.query('BEGIN');
      await holder.query('SELECT txid_current()');
      const daemon = spawnDaemon(['start'], database.environment);
      await daemon.waitForLog('wal.slot_created');
      // Longer than any client-side query timeout, while the slot waits.
      await delay(7_000);
      expect(daemon.child.exitCode).to.equal(null);
      await holder.query('COMMIT');
      await daemon.waitForLog('wal.connected', 30_000);
      await allGone(database, [before!]);
      const caughtUp = await daemon.waitForLog('listener.caught_up');
      expect(caughtUp).to.include({ reason: 'slot_created', deleted: 1 });
      await stopDaemon(daemon);
    } finally {
      await holder.end();
      await database.end();
    }
  });

  it('refuses to publish a table without a replica identity, whose UPDATEs publishing would break (exit 2)', async () => {
    const database = await walDatabase(server);
    try {
      await database.query(
        `CREATE TABLE keyless_tokens (id uuid NOT NULL DEFAULT gen_random_uuid(),
           revoked boolean NOT NULL DEFAULT false, expires_at timestamptz NOT NULL)`,
      );
      const environment = {
        ...database.environment,
        REFRESH_TOKENS_TABLE: 'keyless_tokens',
        PURGE_WAL_SLOT: `${database.slot}_keyless`,
      };
      for (const command of ['install', 'start']) {
        const result = await runCli([command], environment);
        expect(result.code, result.stderr).to.equal(2);
        expect(result.stderr).to.include('public.keyless_tokens').and.include('replica identity');
      }
      const published = await database.query(
        `SELECT FROM pg_publication_tables WHERE tablename = 'keyless_tokens'`,
      );
      expect(published).to.deep.equal([]);
      // The auth service's revocation still works.
      await database.query(
        `INSERT INTO keyless_tokens (expires_at) VALUES (now() + interval '1 day')`,
      );
      await database.query('UPDATE keyless_tokens SET revoked = true');
    } finally {
      await database.end();
    }
  });

  it('refuses to start without the publication, naming install (exit 2)', async () => {
    const database = await walDatabase(server);
    try {
      await database.query(`DROP PUBLICATION ${database.slot}`);
      const result = await runCli(['start'], database.environment);
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr)
        .to.match(/publication/)
        .and.match(/token-reaper install/);
    } finally {
      await database.end();
    }
  });

  describe('the decoder, on the server’s own pgoutput messages', () => {
    let client: pg.Client;
    before(async () => {
      const url = new URL(server.url);
      client = new pg.Client({ connectionString: server.url });
      await client.connect();
      await client.query('CREATE DATABASE pgoutput_decoder');
      await client.end();
      url.pathname = '/pgoutput_decoder';
      client = new pg.Client({ connectionString: url.toString() });
      await client.connect();
    });
    after(async () => {
      await client
        ?.query("SELECT pg_drop_replication_slot('pgoutput_decoder')")
        .catch(() => undefined);
      await client?.end();
    });

    it('reads only the columns asked for, as the server’s text: NULLs, multi-byte text, unchanged TOAST from a whole old row, and skips other tables', async () => {
      await client.query(`
        CREATE TABLE tokens (id text PRIMARY KEY, note text, revoked boolean NOT NULL,
                             revoked_at timestamptz, expires_at timestamptz NOT NULL);
        ALTER TABLE tokens REPLICA IDENTITY FULL;
        CREATE TABLE others (id int PRIMARY KEY, revoked boolean);
        CREATE PUBLICATION pgoutput_decoder FOR TABLE tokens, others
          WITH (publish = 'update, insert')`);
      await client.query(
        "SELECT pg_create_logical_replication_slot('pgoutput_decoder', 'pgoutput')",
      );
      // The slot reads only flushed WAL: commits must flush it, whatever the server's default.
      await client.query('SET synchronous_commit = on');
      const before = Date.now();
      // A note long and random enough to be stored out of line (TOAST), then left unchanged.
      const note = Array.from({ length: 400 }, () => Math.random().toString(36)).join('');
      await client.query(
        `INSERT INTO tokens VALUES ('clé-ü', $1, false, NULL, '2030-01-02 03:04:05.678+00')`,
        [note],
      );
      await client.query(
        "UPDATE tokens SET revoked = true, revoked_at = '2026-12-06 01:02:03+00' WHERE id = 'clé-ü'",
      );
      await client.query('INSERT INTO others VALUES (1, true)');
      const messages = await client.query<{ data: Buffer }>(
        `SELECT data FROM pg_logical_slot_peek_binary_changes('pgoutput_decoder', NULL, NULL,
           'proto_version', '1', 'publication_names', '"pgoutput_decoder"')`,
      );
      const walEnd = BigInt(
        (await client.query<{ lsn: string }>("SELECT pg_current_wal_lsn() - '0/0' AS lsn")).rows[0]!
          .lsn,
      );
      const decoder = createPgoutputDecoder((table) =>
        table === 'public.tokens' ? ['id', 'note', 'revoked', 'revoked_at'] : null,
      );
      const decoded = messages.rows.map((row) => decoder.decode(row.data));
      const changes = decoded.filter(
        (message) => message.tag === 'insert' || message.tag === 'update',
      );
      expect(changes).to.deep.equal([
        {
          tag: 'insert',
          table: 'public.tokens',
          values: { id: 'clé-ü', note, revoked: 'f', revoked_at: null },
        },
        {
          tag: 'update',
          table: 'public.tokens',
          values: { id: 'clé-ü', note, revoked: 't', revoked_at: '2026-12-06 01:02:03+00' },
        },
      ]);
      // Three transactions, each a begin and a commit; the other table's change is skipped.
      expect(decoded.map((message) => message.tag).filter((tag) => tag !== 'other')).to.deep.equal([
        'begin',
        'insert',
        'commit',
        'begin',
        'update',
        'commit',
        'begin',
        'commit',
      ]);
      let previousEnd = 0n;
      for (const message of decoded) {
        if (message.tag === 'begin') {
          expect(message.commitTimeMs).to.be.within(before - 60_000, Date.now() + 60_000);
        }
        if (message.tag === 'commit') {
          expect(message.endLsn > previousEnd && message.endLsn <= walEnd).to.equal(true);
          previousEnd = message.endLsn;
        }
      }
    });
  });
});

describe('PURGE_SOURCE=wal on a server with wal_level=replica', function () {
  this.timeout(120_000);
  let server: OwnedServer;
  before(async () => {
    server = await startOwnedServer({ settings: ['wal_level=replica'] });
    const client = new pg.Client({ connectionString: server.url });
    await client.connect();
    try {
      await createReferenceSchema(client, { passwordResetsTable: null });
    } finally {
      await client.end();
    }
  });
  after(async () => {
    await server?.dispose();
  });

  for (const command of ['install', 'start']) {
    it(`${command} exits 2 with the fix`, async () => {
      const result = await runCli([command], {
        DATABASE_URL: server.url,
        PASSWORD_RESETS_TABLE: 'none',
        PURGE_SOURCE: 'wal',
      });
      expect(result.code, result.stderr).to.equal(2);
      expect(result.stderr)
        .to.include('wal_level')
        .and.include('ALTER SYSTEM SET wal_level = logical');
    });
  }
});
