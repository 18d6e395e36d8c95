// Prompt purge, end to end: the revoke trigger fires NOTIFY, a spawned `token-reaper start`
// deletes the row, and nothing (a killed backend, a restarted server, garbage on the channel,
// a burst of 100,000) makes it lose a revocation or delete a live token.
import { readFile } from 'node:fs/promises';
import { expect } from 'chai';
import pg from 'pg';
import { parseRevocation } from '../src/purge/payload.js';
import type { TableShape } from '../src/schema.js';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { startOwnedServer, useTestDatabase } from './support/database.js';
import {
  allIds,
  createReferenceSchema,
  deadCount,
  insertRandomRows,
  liveIds,
  revokeThenUndo,
  type DatabaseTarget,
} from './support/fixtures.js';

type Query = (text: string, parameters?: unknown[]) => Promise<Record<string, unknown>[]>;

async function installedSchema(url: string, database: DatabaseTarget) {
  await createReferenceSchema(database, { passwordResetsTable: null });
  const install = await runCli(['install'], { DATABASE_URL: url, PASSWORD_RESETS_TABLE: 'none' });
  expect(install.code, install.stderr + install.stdout).to.equal(0);
}

async function liveTokens(query: Query, count: number): Promise<string[]> {
  const rows = await query(
    `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
     SELECT gen_random_uuid(), md5(random()::text || i), now() + interval '1 day'
     FROM generate_series(1, ${count}) i RETURNING id::text`,
  );
  return rows.map((row) => row.id as string);
}

async function revoke(query: Query, ids: string[]) {
  await query('UPDATE refresh_tokens SET revoked = true WHERE id = ANY($1::uuid[])', [ids]);
}

async function remaining(query: Query, ids: string[]) {
  const rows = await query(
    'SELECT count(*)::int AS count FROM refresh_tokens WHERE id = ANY($1::uuid[])',
    [ids],
  );
  return rows[0]!.count as number;
}

function allGone(query: Query, ids: string[], timeoutMs = 10_000) {
  return waitFor(async () => (await remaining(query, ids)) === 0, {
    timeoutMs,
    message: `${ids.length} revoked tokens to be purged`,
  });
}

async function startDaemon(url: string): Promise<ProcessHandle> {
  const daemon = spawnDaemon(['start'], { DATABASE_URL: url, PASSWORD_RESETS_TABLE: 'none' });
  // After the first catch-up: a revocation made while it runs may go by either path, and the
  // tests that count purge batches must know which.
  await daemon.waitForLog('listener.caught_up');
  return daemon;
}

async function stopDaemon(daemon: ProcessHandle) {
  daemon.signal('SIGTERM');
  expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
}

describe('prompt purge', () => {
  describe('payload validation', () => {
    const shape = {
      id: { column: 'id', type: 'uuid' },
      relation: { schema: 'public', name: 'refresh_tokens' },
      leaves: [{ schema: 'public', name: 'refresh_tokens_2026_11_25' }],
    } as Pick<TableShape, 'id' | 'relation' | 'leaves'>;
    const id = '0b8e1d4e-4f39-4a5b-9e0b-1c2d3e4f5a6b';
    const revokedAt = '2026-11-25T04:26:15.629+00:00';

    it('accepts the trigger’s payload, also from a partition', () => {
      const payload = { table: 'public.refresh_tokens', id, revoked_at: revokedAt };
      expect(parseRevocation(JSON.stringify(payload), shape)).to.deep.equal({ id, revokedAt });
      const fromPartition = { ...payload, table: 'public.refresh_tokens_2026_11_25' };
      expect(parseRevocation(JSON.stringify(fromPartition), shape)).to.deep.equal({
        id,
        revokedAt,
      });
    });

    it('accepts numeric ids for an integer id column', () => {
      const payload = JSON.stringify({
        table: 'public.refresh_tokens',
        id: 42,
        revoked_at: revokedAt,
      });
      expect(
        parseRevocation(payload, { ...shape, id: { column: 'id', type: 'bigint' } }),
      ).to.deep.equal({
        id: '42',
        revokedAt,
      });
    });

    const bad: [string, string | undefined, RegExp][] = [
      ['nothing', undefined, /empty/],
      ['text that is not JSON', 'revoke everything', /not JSON/],
      ['a JSON array', '[1,2]', /not a JSON object/],
      [
        'another table',
        JSON.stringify({ table: 'public.users', id, revoked_at: revokedAt }),
        /another table/,
      ],
      [
        'an id of the wrong type',
        JSON.stringify({ table: 'public.refresh_tokens', id: 'x', revoked_at: revokedAt }),
        /not a valid uuid/,
      ],
      [
        'a bad time',
        JSON.stringify({ table: 'public.refresh_tokens', id, revoked_at: 'yesterday' }),
        /not an ISO-8601 timestamp/,
      ],
      [
        'an oversized payload',
        JSON.stringify({ table: 'public.refresh_tokens', id, pad: 'x'.repeat(2000) }),
        /too long/,
      ],
    ];
    for (const [name, payload, problem] of bad) {
      it(`rejects ${name}`, () => {
        const result = parseRevocation(payload, shape);
        expect(result).to.have.property('problem').that.matches(problem);
      });
    }
  });

  describe('a running daemon', () => {
    const database = useTestDatabase('purge');
    let daemon: ProcessHandle;
    const query: Query = (text, parameters) => database.query(text, parameters);

    before(async () => {
      await installedSchema(database.url, database.current);
    });
    beforeEach(async () => {
      daemon = await startDaemon(database.url);
    });
    afterEach(async () => {
      if (daemon.signal('SIGTERM')) await daemon.exited;
    });

    it('deletes a revoked token within a deadline, and logs its latency', async () => {
      const [id] = await liveTokens(query, 1);
      const [bystander] = await liveTokens(query, 1);
      await revoke(query, [id!]);
      await allGone(query, [id!], 5_000);
      const batch = await daemon.waitForLog(
        (line) => line.event === 'purge.batch' && line.deleted === 1,
      );
      expect(batch).to.include({ table: 'public.refresh_tokens', ids: 1 });
      expect(batch.latencyMs).to.be.a('number').and.at.least(0);
      expect(batch.durationMs).to.be.a('number');
      expect(await remaining(query, [bystander!])).to.equal(1);
      await stopDaemon(daemon);
    });

    it('catches up on start with the tokens revoked while it was away', async () => {
      await stopDaemon(daemon);
      const ids = await liveTokens(query, 25);
      await revoke(query, ids);
      daemon = await startDaemon(database.url);
      const caughtUp = await daemon.waitForLog('listener.caught_up');
      expect(caughtUp).to.include({ deleted: 25, reason: 'connected' });
      expect(await remaining(query, ids)).to.equal(0);
      await stopDaemon(daemon);
    });

    it('keeps purging after its listener backend is killed, and purges what was revoked meanwhile', async () => {
      const terminated = await query(
        `SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'token-reaper-listener'`,
      );
      expect(terminated).to.deep.equal([{ done: true }]);
      const duringReconnect = await liveTokens(query, 10);
      await revoke(query, duringReconnect);
      await daemon.waitForLog(
        (line) => line.event === 'listener.connected' && line.reconnected === true,
      );
      await allGone(query, duringReconnect);
      const afterReconnect = await liveTokens(query, 3);
      await revoke(query, afterReconnect);
      await allGone(query, afterReconnect);
      await stopDaemon(daemon);
    });

    it('logs and ignores garbage on the channel, deletes no live token for it, and keeps purging', async () => {
      const [live] = await liveTokens(query, 1);
      const garbage = [
        'not json at all',
        JSON.stringify({
          table: 'public.refresh_tokens',
          id: 'DROP TABLE users',
          revoked_at: 'now',
        }),
        JSON.stringify({ table: 'public.refresh_tokens', pad: 'x'.repeat(5_000) }),
        JSON.stringify({
          table: 'auth.other_tokens',
          id: live,
          revoked_at: new Date().toISOString(),
        }),
      ];
      for (const payload of garbage)
        await query(`SELECT pg_notify('refresh_token_revoked', $1)`, [payload]);
      // Well-formed but untrue: the token is live, so the re-checked predicate keeps it.
      await query(`SELECT pg_notify('refresh_token_revoked', $1)`, [
        JSON.stringify({
          table: 'public.refresh_tokens',
          id: live,
          revoked_at: new Date().toISOString(),
        }),
      ]);
      const untrue = await daemon.waitForLog(
        (line) => line.event === 'purge.batch' && line.deleted === 0,
      );
      expect(untrue).to.include({ ids: 1, latencyMs: null });
      const warnings = daemon.logs.filter((line) => line.event === 'listener.bad_payload');
      expect(warnings).to.have.length(4);
      for (const warning of warnings) {
        expect(warning.level).to.equal('warn');
        // No payload text at all: its id may be a token hash.
        expect(warning).to.not.have.property('excerpt');
        expect(warning.length).to.be.a('number');
      }
      expect(await remaining(query, [live!])).to.equal(1);

      const [revoked] = await liveTokens(query, 1);
      await revoke(query, [revoked!]);
      await allGone(query, [revoked!]);
      await stopDaemon(daemon);
    });

    it('deletes nothing for a rolled-back revocation, and keeps a token un-revoked before the purge', async () => {
      const [rolledBack, restored, fence] = await liveTokens(query, 3);
      const client = await database.current.pool.connect();
      try {
        // Revoked, then restored, in one transaction: its NOTIFY still arrives at commit.
        await revokeThenUndo(client, rolledBack!, restored!);
      } finally {
        client.release();
      }
      await revoke(query, [fence!]);
      await allGone(query, [fence!]);
      // The restored token notifies twice (revoked, then restored: an un-revoke notifies
      // too) and the fence once; notifications in one batch are one id. So 2 or 3 ids, never
      // 4: the rolled-back revocation sent nothing. Only the fence went.
      const batches = () => daemon.logs.filter((line) => line.event === 'purge.batch');
      const total = (field: 'ids' | 'deleted') =>
        batches().reduce((sum, line) => sum + (line[field] as number), 0);
      await waitFor(() => total('deleted') >= 1, { message: 'the purge.batch lines' });
      expect(total('ids'), daemon.describeOutput()).to.be.within(2, 3);
      expect(total('deleted')).to.equal(1);
      expect(await remaining(query, [rolledBack!, restored!])).to.equal(2);
      await stopDaemon(daemon);
    });

    it('skips a revoked row another transaction holds locked, purges the rest at once, and the locked one once it is free', async () => {
      const [locked, ...others] = await liveTokens(query, 20);
      // FOR KEY SHARE is the lock a foreign-key check takes; it lets the revoking UPDATE
      // through, but a DELETE would have to wait for it.
      const holder = await database.current.pool.connect();
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM refresh_tokens WHERE id = $1 FOR KEY SHARE', [locked]);
      try {
        await revoke(query, [locked!]);
        await daemon.waitForLog((line) => line.event === 'purge.batch' && line.skipped === 1);
        // While it is held, every other revocation goes promptly.
        await revoke(query, others as string[]);
        await allGone(query, others as string[]);
        expect(await remaining(query, [locked!])).to.equal(1);
      } finally {
        await holder.query('COMMIT');
        holder.release();
      }
      // No sweep runs in this test: the catch-up retried after a backoff deletes it.
      await allGone(query, [locked!]);
      const retry = await daemon.waitForLog(
        (line) => line.event === 'listener.caught_up' && line.reason === 'locked_rows',
      );
      expect(retry).to.not.equal(undefined);
      expect(daemon.logs.filter((line) => line.event === 'purge.failed')).to.deep.equal([]);
      await stopDaemon(daemon);
    });

    it('deletes 100,000 tokens revoked in one UPDATE, with its memory bounded', async function () {
      this.timeout(120_000);
      await insertRandomRows(database.current, {
        table: 'refresh_tokens',
        count: 100_000,
        fractions: { live: 1 },
        seed: 0.5,
      });
      const before = await query(
        `SELECT count(*)::int AS count FROM refresh_tokens WHERE NOT revoked`,
      );
      await query(`UPDATE refresh_tokens SET revoked = true WHERE NOT revoked`);
      await waitFor(
        async () =>
          (await query(`SELECT count(*)::int AS count FROM refresh_tokens`))[0]!.count === 0,
        { timeoutMs: 90_000, message: 'every revoked token to be purged' },
      );
      expect(before[0]!.count).to.be.at.least(100_000);
      expect(daemon.logs.some((line) => line.event === 'purge.queue_full')).to.equal(true);
      // VmHWM is the process's peak resident set, kept by the kernel.
      const status = await readFile(`/proc/${daemon.child.pid}/status`, 'utf8');
      const peakKilobytes = Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]);
      expect(peakKilobytes / 1024, 'peak RSS in MB').to.be.below(250);
      await stopDaemon(daemon);
    });
  });

  describe('a sweep during the catch-up', () => {
    const database = useTestDatabase('purge_overlap');

    it('deletes every dead row exactly once, and neither the catch-up nor the sweep fails', async () => {
      await installedSchema(database.url, database.current);
      await insertRandomRows(database.current, {
        table: 'refresh_tokens',
        count: 60_000,
        fractions: { live: 0.4, revoked: 0.4, expired: 0.2 },
        seed: Math.random(),
      });
      const live = await liveIds(database.current, { table: 'refresh_tokens' });
      const dead = await deadCount(database.current, { table: 'refresh_tokens' });
      // The catch-up on connect is under way when daemon.started is logged.
      const daemon = await startDaemon(database.url);
      daemon.signal('SIGUSR1');
      const caughtUp = await daemon.waitForLog('listener.caught_up');
      const swept = await daemon.waitForLog('sweep.finished');
      const failures = daemon.logs.filter((line) =>
        ['listener.catch_up_failed', 'sweep.failed', 'purge.failed'].includes(line.event),
      );
      expect(failures, daemon.describeOutput()).to.deep.equal([]);
      expect((caughtUp.deleted as number) + (swept.deleted as number)).to.equal(dead);
      expect(await allIds(database.current, { table: 'refresh_tokens' })).to.deep.equal(live);
      await stopDaemon(daemon);
    });
  });

  describe('a database server that goes away', () => {
    it('reconnects after a stop of more than 10 s and purges the revocations made meanwhile', async function () {
      this.timeout(120_000);
      const server = await startOwnedServer().catch(() => null);
      if (server === null) this.skip();
      const pool = new pg.Pool({ connectionString: server.url, max: 2 });
      pool.on('error', () => undefined);
      const query: Query = async (text, parameters) => (await pool.query(text, parameters)).rows;
      try {
        await installedSchema(server.url, pool);
        const daemon = await startDaemon(server.url);
        await server.stop();
        await daemon.waitForLog('listener.disconnected');
        // The outage itself is the scenario: it has to last longer than 10 s.
        await new Promise((resolve) => setTimeout(resolve, 10_500));
        await server.start();
        const meanwhile = await liveTokens(query, 20);
        await revoke(query, meanwhile);
        await daemon.waitForLog(
          (line) => line.event === 'listener.connected' && line.reconnected === true,
          30_000,
        );
        await allGone(query, meanwhile, 20_000);
        const later = await liveTokens(query, 2);
        await revoke(query, later);
        await allGone(query, later);
        await stopDaemon(daemon);
      } finally {
        await pool.end();
        await server.dispose();
      }
    });
  });
});
