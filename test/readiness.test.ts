// /readyz means "revocations would be deleted now": it turns 503, with the reason, when the
// trigger is dropped, when the role loses DELETE, when the database turns read-only, and back
// to 200 once each is repaired, while the listener stays connected throughout.
import { expect } from 'chai';
import pg from 'pg';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { useTestDatabase, withServerClient } from './support/database.js';
import { findFreePort } from './support/embedded-server.js';
import { createReferenceSchema } from './support/fixtures.js';
import { giveLogin, urlAs, useRoles } from './support/roles.js';

describe('readiness that means it', function () {
  this.timeout(90_000);
  const database = useTestDatabase('readiness');
  const roleName = useRoles(database);
  let daemon: ProcessHandle;
  let port: number;
  let role: string;

  const readyz = async () => {
    const response = await fetch(`http://127.0.0.1:${port}/readyz`);
    return { status: response.status, body: (await response.json()) as { reasons?: string[] } };
  };
  const becomes = (status: number, reason?: string) =>
    waitFor(
      async () => {
        const answer = await readyz();
        if (answer.status !== status) return undefined;
        if (reason !== undefined && !(answer.body.reasons ?? []).includes(reason)) return undefined;
        return answer;
      },
      { message: `/readyz to answer ${status}${reason ? ` with ${reason}` : ''}` },
    );
  /** Ends the daemon's pool connections, so that new ones take the database's settings. */
  const reconnectPool = () =>
    database.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                    WHERE datname = current_database() AND application_name = 'token-reaper'`);

  before(async () => {
    await createReferenceSchema(database.current, { passwordResetsTable: null });
    role = roleName('readiness');
    await database.query(`CREATE ROLE ${pg.escapeIdentifier(role)}`);
    await giveLogin(database, role);
    const environment = { DATABASE_URL: database.url, PASSWORD_RESETS_TABLE: 'none' };
    const install = await runCli(['install', '--role', role], environment);
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    port = await findFreePort();
    daemon = spawnDaemon(['start'], {
      DATABASE_URL: urlAs(database.url, role),
      PASSWORD_RESETS_TABLE: 'none',
      METRICS_PORT: String(port),
      METRICS_HOST: '127.0.0.1',
      READINESS_CHECK_INTERVAL: '1s',
    });
    await daemon.waitForLog('listener.caught_up');
    await becomes(200);
  });

  after(async () => {
    daemon.signal('SIGTERM');
    expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
  });

  it('is unready while the revoke trigger is missing, and ready once it is back', async () => {
    await database.query('DROP TRIGGER token_reaper_notify_revoked ON refresh_tokens');
    await becomes(503, 'trigger_missing');
    const unready = await daemon.waitForLog('daemon.unready');
    expect(unready.reasons).to.deep.equal(['trigger_missing']);
    const install = await runCli(['install'], {
      DATABASE_URL: database.url,
      PASSWORD_RESETS_TABLE: 'none',
    });
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    await becomes(200);
  });

  it('is unready while the role may not DELETE, and ready once it may again', async () => {
    await database.query(`REVOKE DELETE ON refresh_tokens FROM ${pg.escapeIdentifier(role)}`);
    await becomes(503, 'delete_denied');
    await database.query(`GRANT DELETE ON refresh_tokens TO ${pg.escapeIdentifier(role)}`);
    await becomes(200);
  });

  it('is unready while the database is read-only, and ready once it is writable', async () => {
    // From the server's own database: a session of this one might already be read-only.
    await withServerClient((client) =>
      client.query(
        `ALTER DATABASE ${pg.escapeIdentifier(database.name)} SET default_transaction_read_only = on`,
      ),
    );
    await reconnectPool();
    await becomes(503, 'database_read_only');
    await withServerClient((client) =>
      client.query(
        `ALTER DATABASE ${pg.escapeIdentifier(database.name)} RESET default_transaction_read_only`,
      ),
    );
    await reconnectPool();
    await becomes(200);
    expect(daemon.logs.some((line) => line.event === 'listener.disconnected')).to.equal(false);
  });
});
