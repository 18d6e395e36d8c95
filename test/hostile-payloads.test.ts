// NOTIFY needs no privilege: any role that can connect can send the daemon anything. These
// tests send it what an attacker, a buggy client or an odd row would, next to real
// revocations, and check that every real revocation still goes by the prompt path, that no
// live token goes, that no payload shortens a grace, and that a flood costs bounded memory
// and bounded log lines.
import { readFile } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { expect } from 'chai';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';
import { writeTargetsFile } from './support/targets.js';

const CHANNEL = 'refresh_token_revoked';

describe('hostile notifications and odd rows', () => {
  const database = useTestDatabase('hostile');
  const query = (text: string, parameters?: unknown[]) => database.query(text, parameters);

  async function liveTokens(count: number): Promise<string[]> {
    const rows = await query(
      `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
       SELECT gen_random_uuid(), md5(random()::text || i), now() + interval '1 day'
       FROM generate_series(1, ${count}) i RETURNING id::text`,
    );
    return rows.map((row) => row.id as string);
  }

  async function remaining(ids: readonly string[]) {
    const rows = await query(
      'SELECT count(*)::int AS count FROM refresh_tokens WHERE id = ANY($1::uuid[])',
      [ids],
    );
    return rows[0]!.count as number;
  }

  /** Sends every payload in one statement, so they arrive together. */
  async function notifyAll(payloads: readonly string[]) {
    await query(`SELECT count(pg_notify($1, payload)) FROM unnest($2::text[]) payload`, [
      CHANNEL,
      payloads,
    ]);
  }

  async function stop(daemon: ProcessHandle) {
    daemon.signal('SIGTERM');
    expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
  }

  describe('on the reference schema', () => {
    const environment = (extra: Record<string, string> = {}) => ({
      DATABASE_URL: database.url,
      PASSWORD_RESETS_TABLE: 'none',
      ...extra,
    });

    before(async () => {
      await createReferenceSchema(database.current, { passwordResetsTable: null });
      const install = await runCli(['install'], environment());
      expect(install.code, install.stderr + install.stdout).to.equal(0);
    });

    async function start(extra: Record<string, string> = {}) {
      const daemon = spawnDaemon(['start'], environment(extra));
      await daemon.waitForLog('listener.caught_up');
      return daemon;
    }

    it('purges 100 real revocations promptly among 1,000 forged payloads, and no live token', async () => {
      const daemon = await start();
      const live = await liveTokens(200);
      const real = await liveTokens(100);
      const forged = (index: number) => {
        switch (index % 5) {
          case 0: // a time Date.parse takes and PostgreSQL does not
            return { table: 'public.refresh_tokens', id: randomUUID(), revoked_at: '1' };
          case 1: // 30 February, which Date.parse rolls over into March
            return {
              table: 'public.refresh_tokens',
              id: randomUUID(),
              revoked_at: '2026-02-30T00:00:00Z',
            };
          case 2: // an id no uuid column holds; distinct, or PostgreSQL folds the NOTIFYs
            return {
              table: 'public.refresh_tokens',
              id: `${index}99999999999999999999`,
              revoked_at: new Date().toISOString(),
            };
          default: // a live token, with a time long past: the re-checked rule keeps it
            return {
              table: 'public.refresh_tokens',
              id: live[index % live.length],
              revoked_at: '2000-01-01T00:00:00Z',
            };
        }
      };
      const purged = new Set<string>();
      const since = daemon.logs.length;
      for (let round = 0; round < 10; round += 1) {
        await notifyAll(
          Array.from({ length: 100 }, (_, index) => JSON.stringify(forged(round * 100 + index))),
        );
        const ten = real.slice(round * 10, round * 10 + 10);
        await query('UPDATE refresh_tokens SET revoked = true WHERE id = ANY($1::uuid[])', [ten]);
        for (const id of ten) purged.add(id);
      }
      // The log line follows the commit, so wait for the lines, not only for the rows.
      const batches = () => daemon.logs.slice(since).filter((line) => line.event === 'purge.batch');
      const deleted = () => batches().reduce((sum, line) => sum + (line.deleted as number), 0);
      await waitFor(() => deleted() >= 100, {
        timeoutMs: 10_000,
        message: '100 real revocations purged',
      });
      // The prompt path deleted every one, each within a second of its revocation on the
      // database clock, and nothing failed.
      expect(deleted(), daemon.describeOutput()).to.equal(100);
      expect(await remaining(real)).to.equal(0);
      for (const batch of batches().filter((line) => line.latencyMs !== null)) {
        expect(batch.latencyMs as number).to.be.below(1_000);
      }
      expect(daemon.logs.filter((line) => line.event === 'purge.failed')).to.deep.equal([]);
      expect(await remaining(live)).to.equal(live.length);
      // Bounded: the first of each kind at once, then counts per interval.
      const warnings = daemon.logs.filter((line) => line.event === 'listener.bad_payload');
      expect(warnings.length).to.be.within(2, 6);
      await stop(daemon);
      const reported = daemon.logs
        .filter((line) => line.event === 'listener.bad_payload')
        .reduce((sum, line) => sum + (line.count as number), 0);
      expect(reported, 'every bad payload counted').to.equal(600);
    });

    it('skips a locked revoked row in the catch-up on connect, and deletes it once it is free', async () => {
      const tokens = await liveTokens(50);
      const [locked] = tokens;
      const holder = await database.current.pool.connect();
      let daemon: ProcessHandle | undefined;
      try {
        // Revoked before the daemon starts, so only the catch-up on connect can see them.
        await query('UPDATE refresh_tokens SET revoked = true WHERE id = ANY($1::uuid[])', [
          tokens,
        ]);
        await holder.query('BEGIN');
        await holder.query('SELECT 1 FROM refresh_tokens WHERE id = $1 FOR KEY SHARE', [locked]);
        daemon = spawnDaemon(['start'], environment({ STATEMENT_TIMEOUT_MS: '3000' }));
        const caughtUp = await daemon.waitForLog('listener.caught_up');
        expect(caughtUp, daemon.describeOutput()).to.include({ deleted: 49, skipped: 1 });
        expect(await remaining(tokens)).to.equal(1);
      } finally {
        await holder.query('COMMIT');
        holder.release();
      }
      await waitFor(async () => (await remaining(tokens)) === 0, {
        timeoutMs: 10_000,
        message: 'the locked row to go once it was released',
      });
      expect(daemon!.logs.filter((line) => line.event === 'sweep.started')).to.deep.equal([]);
      await stop(daemon!);
    });

    it('survives a flood of 200,000 garbage notifications with stdout stalled, in bounded memory', async function () {
      this.timeout(180_000);
      const daemon = await start();
      // Nobody reads stdout from here on: its pipe fills, and the logger must drop, not buffer.
      daemon.child.stdout!.pause();
      const garbage = Array.from({ length: 10_000 }, (_, index) =>
        index % 2 === 0
          ? `not json ${index}`
          : JSON.stringify({ table: 'public.other', id: index }),
      );
      const real = await liveTokens(20);
      for (let round = 0; round < 20; round += 1) {
        await notifyAll(garbage);
        await query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [real[round]]);
      }
      await waitFor(async () => (await remaining(real)) === 0, {
        timeoutMs: 30_000,
        message: 'the real revocations purged during the flood',
      });
      const status = await readFile(`/proc/${daemon.child.pid}/status`, 'utf8');
      const peakMegabytes = Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) / 1024;
      daemon.child.stdout!.resume();
      await stop(daemon);
      expect(peakMegabytes, 'peak RSS in MB').to.be.below(150);
      const aboutGarbage = daemon.logs.filter((line) => line.event === 'listener.bad_payload');
      expect(aboutGarbage.length, 'log lines about the flood').to.be.below(50);
    });
  });

  describe('the grace counts from a time the database gives', () => {
    const GRACE_SECONDS = 30;
    const environment = () => ({
      DATABASE_URL: database.url,
      PASSWORD_RESETS_TABLE: 'none',
      REFRESH_TOKEN_REVOKED_GRACE: `${GRACE_SECONDS}s`,
    });
    let daemon: ProcessHandle;

    before(async () => {
      await query('DROP TABLE IF EXISTS refresh_tokens CASCADE');
      await createReferenceSchema(database.current, { passwordResetsTable: null });
      const install = await runCli(['install'], environment());
      expect(install.code, install.stderr + install.stdout).to.equal(0);
      daemon = spawnDaemon(['start'], environment());
      await daemon.waitForLog('listener.caught_up');
    });

    after(async () => {
      await stop(daemon);
    });

    async function recordedAt(id: string): Promise<number | null> {
      const rows = await query(
        `SELECT reaper_revoked_at AS at FROM token_reaper.revocations
         WHERE reaper_relation = 'public.refresh_tokens' AND reaper_token_id = $1`,
        [id],
      );
      return rows.length === 0 ? null : new Date(rows[0]!.at as string).getTime();
    }

    async function revokedNow(id: string, revoked = true): Promise<number> {
      const [row] = await query(
        `WITH changed AS (UPDATE refresh_tokens SET revoked = $2 WHERE id = $1 RETURNING 1)
         SELECT now() AS at FROM changed`,
        [id, revoked],
      );
      return new Date(row!.at as string).getTime();
    }

    const recorded = (id: string) =>
      waitFor(async () => (await recordedAt(id)) ?? undefined, {
        message: `a revocation time for ${id}`,
      });

    it('records nothing for a live token named in a forged payload, and a forged past time does not shorten the grace', async () => {
      const [target, control] = await liveTokens(2);
      // A payload that says the target was revoked long ago; the daemon looks at the row.
      const forgePastRevocation = async () => {
        const since = daemon.logs.length;
        const payload = {
          table: 'public.refresh_tokens',
          id: target,
          revoked_at: '2000-01-01T00:00:00Z',
        };
        await notifyAll([JSON.stringify(payload)]);
        return daemon.waitForLog('purge.recorded', undefined, since);
      };
      expect(await forgePastRevocation()).to.include({ ids: 1, recorded: 0 });
      expect(await recordedAt(target!)).to.equal(null);

      const revokedAt = await revokedNow(target!);
      await revokedNow(control!);
      // The record is the database's now() when the daemon first saw it revoked: never the
      // payload's time, and never before the revocation.
      expect(await recorded(target!)).to.be.at.least(revokedAt);
      expect(await recorded(control!)).to.be.at.least(revokedAt);
      // Another forged payload for the now revoked token changes nothing.
      const first = await recordedAt(target!);
      await forgePastRevocation();
      expect(await recordedAt(target!)).to.equal(first);
      expect(await remaining([target!, control!])).to.equal(2);
    });

    it('counts from the second revocation after a revoke, an un-revoke and a re-revoke', async () => {
      const [token] = await liveTokens(1);
      await revokedNow(token!);
      await recorded(token!);
      await revokedNow(token!, false);
      // The un-revoke notifies too, and the daemon forgets the time.
      await waitFor(async () => (await recordedAt(token!)) === null, {
        message: 'the record forgotten after the un-revoke',
      });
      const second = await revokedNow(token!);
      expect(await recorded(token!)).to.be.at.least(second);
    });
  });

  describe('bigint ids past 2^53', () => {
    it('purges them promptly, with no bad payload', async () => {
      await query(`CREATE TABLE big_tokens (id bigint PRIMARY KEY, revoked boolean NOT NULL DEFAULT false,
                     expires_at timestamptz NOT NULL)`);
      const ids = ['9007199254740993', '4611686018427387904', '9223372036854775807'];
      await query(
        `INSERT INTO big_tokens (id, expires_at)
         SELECT unnest($1::bigint[]), now() + interval '1 day'`,
        [ids],
      );
      const file = await writeTargetsFile({
        targets: [
          { table: 'big_tokens', marker: { column: 'revoked' }, expiry: { column: 'expires_at' } },
        ],
      });
      const environment = { DATABASE_URL: database.url };
      try {
        const install = await runCli(['install', '--config', file.path], environment);
        expect(install.code, install.stderr + install.stdout).to.equal(0);
        const daemon = spawnDaemon(['start', '--config', file.path], environment);
        await daemon.waitForLog('listener.caught_up');
        const since = daemon.logs.length;
        await query('UPDATE big_tokens SET revoked = true WHERE id = ANY($1::bigint[])', [ids]);
        await waitFor(
          async () =>
            (await query('SELECT count(*)::int AS count FROM big_tokens'))[0]!.count === 0,
          { message: 'the bigint tokens purged' },
        );
        const deleted = daemon.logs
          .slice(since)
          .filter((line) => line.event === 'purge.batch')
          .reduce((sum, line) => sum + (line.deleted as number), 0);
        expect(deleted, daemon.describeOutput()).to.equal(3);
        expect(daemon.logs.filter((line) => line.event === 'listener.bad_payload')).to.deep.equal(
          [],
        );
        await stop(daemon);
      } finally {
        await file.remove();
      }
    });
  });
});
