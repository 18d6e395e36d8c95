// REFRESH_TOKEN_REVOKED_GRACE: a revoked token is kept for the grace, by the purge (under
// every PURGE_SOURCE) and the sweep alike, also across a restart of the daemon, and goes once
// the grace has passed.
import { expect } from 'chai';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { useLogicalServer, useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

const GRACE_SECONDS = 6;

const SOURCES = ['notify', 'wal', 'poll'] as const;

describe('the grace for revoked tokens', () => {
  const logicalServer = useLogicalServer();
  for (const [shape, source] of SOURCES.flatMap((each) =>
    (['boolean', 'timestamp'] as const).map((kind) => [kind, each] as const),
  )) {
    describe(`with a ${shape} revoked column, PURGE_SOURCE=${source}`, () => {
      const database = useTestDatabase(`grace_${shape}_${source}`, {
        ...(source === 'wal' ? { server: logicalServer } : {}),
      });
      const environment = () => ({
        DATABASE_URL: database.url,
        PASSWORD_RESETS_TABLE: 'none',
        REFRESH_TOKEN_REVOKED_GRACE: `${GRACE_SECONDS}s`,
        PURGE_SOURCE: source,
        PURGE_WAL_SLOT: database.name,
      });
      const revokeSql =
        shape === 'boolean'
          ? 'UPDATE refresh_tokens SET revoked = true WHERE id = $1'
          : 'UPDATE refresh_tokens SET revoked_at = now() WHERE id = $1';

      before(async () => {
        await createReferenceSchema(database.current, {
          revokedShape: shape,
          passwordResetsTable: null,
        });
        const install = await runCli(['install'], environment());
        expect(install.code, install.stderr + install.stdout).to.equal(0);
      });

      async function exists(id: string) {
        const rows = await database.query('SELECT 1 FROM refresh_tokens WHERE id = $1', [id]);
        return rows.length === 1;
      }

      async function start(): Promise<ProcessHandle> {
        const daemon = spawnDaemon(['start'], environment());
        await daemon.waitForLog('daemon.started');
        await daemon.waitForLog(source === 'wal' ? 'wal.connected' : 'listener.caught_up');
        return daemon;
      }

      async function stop(daemon: ProcessHandle) {
        daemon.signal('SIGTERM');
        expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({
          code: 0,
          signal: null,
        });
      }

      it('keeps a revoked token through a purge, a sweep and a restart, then deletes it', async function () {
        this.timeout(60_000);
        const [token] = await database.query(
          `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
           VALUES (gen_random_uuid(), md5(random()::text), now() + interval '1 day') RETURNING id::text`,
        );
        const id = token!.id as string;
        let daemon = await start();
        const [revoked] = await database.query(
          `WITH revoke AS (${revokeSql} RETURNING 1) SELECT now() AS at FROM revoke`,
          [id],
        );
        const revokedAt = new Date(revoked!.at as string).getTime();
        if (shape === 'boolean' && source !== 'poll') {
          // The NOTIFY (or the decoded change) records the revocation's time instead of
          // deleting; a poll records it in its catch-up.
          const recorded = await daemon.waitForLog('purge.recorded');
          expect(recorded).to.include({ ids: 1, recorded: 1, graceSeconds: GRACE_SECONDS });
        }
        const since = daemon.logs.length;
        daemon.signal('SIGUSR1');
        await daemon.waitForLog('sweep.finished', undefined, since);
        expect(await exists(id), 'kept by the sweep inside the grace').to.equal(true);

        await stop(daemon);
        daemon = await start();
        expect(await exists(id), 'kept after a restart inside the grace').to.equal(true);
        const [clock] = await database.query('SELECT now() AS now');
        expect(new Date(clock!.now as string).getTime() - revokedAt).to.be.below(
          GRACE_SECONDS * 1000,
        );

        await waitFor(async () => !(await exists(id)), {
          timeoutMs: 30_000,
          message: 'the token to go once its grace had passed',
        });
        const [gone] = await database.query('SELECT now() AS now');
        expect(new Date(gone!.now as string).getTime() - revokedAt).to.be.at.least(
          GRACE_SECONDS * 1000,
        );
        await stop(daemon);
        // The slot would keep the database from being dropped.
        const uninstall = await runCli(['uninstall'], environment());
        expect(uninstall.code, uninstall.stderr + uninstall.stdout).to.equal(0);
      });
    });
  }
});
