// PURGE_SOURCE=poll end to end: no trigger and no slot; the daemon's catch-up runs every
// PURGE_POLL_INTERVAL_MS and deletes what was revoked since. (Through a transaction-mode
// PgBouncer with no session at all: pgbouncer.test.ts.)
import { expect } from 'chai';
import { runCli, spawnDaemon, waitFor } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

const INTERVAL_MS = 1_000;

describe('PURGE_SOURCE=poll', function () {
  this.timeout(120_000);
  const database = useTestDatabase('poll');
  const environment = () => ({
    DATABASE_URL: database.url,
    PASSWORD_RESETS_TABLE: 'none',
    PURGE_SOURCE: 'poll',
    PURGE_POLL_INTERVAL_MS: String(INTERVAL_MS),
  });

  const tokens = async (count: number) =>
    (
      await database.query<{ id: string }>(
        `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
         SELECT gen_random_uuid(), md5(random()::text || i), now() + interval '1 day'
         FROM generate_series(1, $1) i RETURNING id::text`,
        [count],
      )
    ).map((row) => row.id);
  const remaining = async (ids: readonly string[]) =>
    (
      await database.query<{ count: number }>(
        'SELECT count(*)::int AS count FROM refresh_tokens WHERE id = ANY($1::uuid[])',
        [ids],
      )
    )[0]!.count;

  before(async () => {
    await createReferenceSchema(database.current, { passwordResetsTable: null });
    const install = await runCli(['install'], environment());
    expect(install.code, install.stderr + install.stdout).to.equal(0);
  });

  it('installs no trigger, and purges a revocation within the interval, by a poll', async () => {
    const triggers = await database.query(
      `SELECT tgname FROM pg_trigger WHERE tgrelid = 'refresh_tokens'::regclass AND NOT tgisinternal`,
    );
    expect(triggers).to.deep.equal([]);
    const daemon = spawnDaemon(['start'], environment());
    const started = await daemon.waitForLog('daemon.started');
    expect(started.source).to.equal('poll');
    await daemon.waitForLog('listener.caught_up');

    const [revoked, live] = await tokens(2);
    await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [revoked]);
    const revokedAt = performance.now();
    await waitFor(async () => (await remaining([revoked!])) === 0, {
      timeoutMs: 10_000,
      message: 'the revoked token to be polled away',
    });
    // Gone by the next poll: within the interval, plus the poll's own few milliseconds and
    // this test's polling of the table.
    expect(performance.now() - revokedAt).to.be.below(INTERVAL_MS + 500);
    const polled = await daemon.waitForLog('purge.polled');
    expect(polled.deleted).to.equal(1);
    expect(await remaining([live!])).to.equal(1);

    daemon.signal('SIGTERM');
    expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
  });
});
