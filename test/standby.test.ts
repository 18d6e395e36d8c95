// Standbys and failovers, on throwaway clusters of the machine's own PostgreSQL: every command
// pointed at a streaming replica says it needs the primary and exits 2, and a daemon whose
// primary is restarted as a standby waits, unready, says why, turns unhealthy after
// LISTENER_DOWN_UNHEALTHY_AFTER, and purges again once the standby is promoted, with no
// restart.
import { expect } from 'chai';
import pg from 'pg';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { createCluster, type Cluster } from './support/cluster.js';
import { findFreePort } from './support/embedded-server.js';
import { createReferenceSchema } from './support/fixtures.js';

describe('standbys and failovers', function () {
  this.timeout(180_000);
  let primary: Cluster | null = null;
  let replica: Cluster | null = null;

  const environment = (url: string) => ({ DATABASE_URL: url, PASSWORD_RESETS_TABLE: 'none' });
  const query = async (url: string, text: string, parameters: unknown[] = []) => {
    const client = new pg.Client({ connectionString: url });
    client.on('error', () => undefined);
    await client.connect();
    try {
      return (await client.query(text, parameters)).rows;
    } finally {
      await client.end();
    }
  };

  before(async function () {
    primary = await createCluster();
    if (primary === null) {
      console.error('skipped: no PostgreSQL server binaries under /usr/lib/postgresql');
      this.skip();
    }
    const pool = new pg.Pool({ connectionString: primary.url });
    try {
      await createReferenceSchema(pool, { passwordResetsTable: null });
    } finally {
      await pool.end();
    }
    const install = await runCli(['install'], environment(primary.url));
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    replica = await primary.replica();
  });

  after(async () => {
    await replica?.dispose();
    await primary?.dispose();
  });

  for (const command of [['start'], ['sweep'], ['install'], ['explain']]) {
    it(`${command.join(' ')} against a streaming replica exits 2: it needs the primary`, async () => {
      const result = await runCli(command, environment(replica!.url));
      expect(result.code, result.stderr + result.stdout).to.equal(2);
      expect(result.stderr + result.stdout).to.include('needs the primary');
    });
  }

  it('waits through its primary restarted as a standby, and purges again once it is promoted', async () => {
    const port = await findFreePort();
    const daemon: ProcessHandle = spawnDaemon(['start'], {
      ...environment(primary!.url),
      METRICS_PORT: String(port),
      METRICS_HOST: '127.0.0.1',
      LISTENER_DOWN_UNHEALTHY_AFTER: '3s',
      READINESS_CHECK_INTERVAL: '1s',
    });
    const probe = async (path: string) => {
      const response = await fetch(`http://127.0.0.1:${port}${path}`);
      return { status: response.status, body: await response.text() };
    };
    try {
      await daemon.waitForLog('listener.caught_up');
      expect((await probe('/healthz')).status).to.equal(200);

      await primary!.restartAsStandby();
      await daemon.waitForLog('database.standby', 30_000);
      const unready = await probe('/readyz');
      expect(unready.status).to.equal(503);
      expect(unready.body).to.include('database_standby');
      // Down past LISTENER_DOWN_UNHEALTHY_AFTER: a supervisor may restart it now.
      await waitFor(async () => (await probe('/healthz')).status === 503, {
        message: '/healthz to turn unhealthy',
      });
      // Each failed attempt says why: refused while it restarted, then a standby.
      const reasons = daemon.logs
        .filter((line) => line.event === 'listener.reconnecting')
        .map((line) => JSON.stringify(line['error']));
      expect(reasons.some((reason) => reason.includes('needs the primary'))).to.equal(true);

      const since = daemon.logs.length;
      await primary!.promote();
      const promotedAt = Date.now();
      await daemon.waitForLog(
        (line) => line.event === 'listener.connected' && line.reconnected === true,
        30_000,
        since,
      );
      const [token] = await query(
        primary!.url,
        `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
         VALUES (gen_random_uuid(), md5(random()::text), now() + interval '1 day') RETURNING id::text`,
      );
      await query(primary!.url, 'UPDATE refresh_tokens SET revoked = true WHERE id = $1', [
        token!.id,
      ]);
      await waitFor(
        async () =>
          (await query(primary!.url, 'SELECT 1 FROM refresh_tokens WHERE id = $1', [token!.id]))
            .length === 0,
        { timeoutMs: 30_000, message: 'a revocation purged after the promotion' },
      );
      expect(Date.now() - promotedAt).to.be.below(30_000);
      await waitFor(async () => (await probe('/healthz')).status === 200, {
        message: '/healthz healthy again',
      });
      await waitFor(async () => (await probe('/readyz')).status === 200, {
        message: '/readyz ready again',
      });
    } finally {
      daemon.signal('SIGTERM');
      expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({
        code: 0,
        signal: null,
      });
    }
  });
});
