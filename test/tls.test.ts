// TLS with a certificate authority of the test's own, as a managed database has one: under
// sslmode=verify-full the pool, install and the listener check that the authority in
// sslrootcert (or PGSSLROOTCERT) signed the server's certificate and that the certificate names
// the host; under verify-ca, the authority only. A wrong authority or host is refused, saying
// what to change.
import { expect } from 'chai';
import pg from 'pg';
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import { loadConfig } from '../src/config.js';
import { createDatabasePool, createPlainClient, listenerConnectionConfig } from '../src/db.js';
import { createCapturingLogger } from './support/capture-logger.js';
import { runCli, spawnDaemon, waitFor } from './support/cli.js';
import { databaseUrl, withServerClient } from './support/database.js';
import { startEmbeddedServer, type EmbeddedServer } from './support/embedded-server.js';
import { createReferenceSchema } from './support/fixtures.js';
import { createTestCertificates, type TestCertificates } from './support/tls.js';

const DATABASE = 'auth';
const sslRow = z.object({ ssl: z.boolean() });

describe('TLS to a server with its own certificate authority', function () {
  this.timeout(120_000);
  let certificates: TestCertificates;
  let server: EmbeddedServer;
  const logger = createCapturingLogger().logger;

  before(async () => {
    certificates = await createTestCertificates();
    server = await startEmbeddedServer({
      persistent: false,
      settings: ['ssl=on', 'ssl_cert_file=server.crt', 'ssl_key_file=server.key'],
      files: {
        'server.crt': certificates.serverCertificate,
        'server.key': certificates.serverKey,
      },
    });
    await withServerClient((client) => client.query(`CREATE DATABASE ${DATABASE}`), server.url);
    const pool = new pg.Pool({ connectionString: databaseUrl(DATABASE, server.url), max: 1 });
    try {
      await createReferenceSchema(pool, { passwordResetsTable: null });
    } finally {
      await pool.end();
    }
  });

  after(async () => {
    await server?.dispose();
    await certificates?.dispose();
  });

  /** The test database's URL, reached at `host`, with these TLS parameters. */
  function tlsUrl(parameters: Record<string, string>, host = certificates.serverAddress) {
    const url = new URL(databaseUrl(DATABASE, server.url));
    url.hostname = host;
    for (const [name, value] of Object.entries(parameters)) url.searchParams.set(name, value);
    return url.toString();
  }

  async function withPool<T>(url: string, work: (pool: DatabasePool) => Promise<T>) {
    const pool = await createDatabasePool(
      { databaseUrl: url, statementTimeoutMs: 10_000 },
      logger,
      {
        maximumPoolSize: 1,
      },
    );
    try {
      return await work(pool);
    } finally {
      await pool.end();
    }
  }

  const usesTls = (pool: DatabasePool) =>
    pool.oneFirst(sql.type(sslRow)`SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()`);

  describe('sslmode=verify-full with the authority that signed the server certificate', () => {
    const verifyFull = () => tlsUrl({ sslmode: 'verify-full', sslrootcert: certificates.caFile });

    it('connects the pool, the listener and a plain client over TLS', async () => {
      expect(await withPool(verifyFull(), usesTls)).to.equal(true);
      for (const client of [
        new pg.Client(listenerConnectionConfig({ databaseUrl: verifyFull() })),
        createPlainClient({ databaseUrl: verifyFull() }, logger),
      ]) {
        await client.connect();
        try {
          const result = await client.query<{ ssl: boolean }>(
            'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()',
          );
          expect(result.rows).to.deep.equal([{ ssl: true }]);
        } finally {
          await client.end();
        }
      }
    });

    it('takes the authority from PGSSLROOTCERT when the URL names none', async () => {
      const config = loadConfig({
        DATABASE_URL: tlsUrl({ sslmode: 'verify-full' }),
        PGSSLROOTCERT: certificates.caFile,
      });
      expect(await withPool(config.databaseUrl, usesTls)).to.equal(true);
    });

    it('runs install and a daemon that purges, every connection encrypted', async () => {
      const environment = { DATABASE_URL: verifyFull(), PASSWORD_RESETS_TABLE: 'none' };
      const install = await runCli(['install'], environment);
      expect(install.code, install.stderr + install.stdout).to.equal(0);

      const daemon = spawnDaemon(['start'], environment);
      await daemon.waitForLog('listener.caught_up');
      await withServerClient(
        async (client) => {
          const connections = await client.query<{ application_name: string; ssl: boolean }>(
            `SELECT DISTINCT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
           WHERE a.application_name LIKE 'token-reaper%' ORDER BY 1`,
          );
          expect(connections.rows).to.deep.include({
            application_name: 'token-reaper-listener',
            ssl: true,
          });
          expect(connections.rows.filter((row) => !row.ssl)).to.deep.equal([]);

          const revoked = await client.query<{ id: string }>(
            `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
           VALUES (gen_random_uuid(), md5(random()::text), now() + interval '1 day') RETURNING id`,
          );
          const id = revoked.rows[0]!.id;
          await client.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [id]);
          await waitFor(
            async () =>
              (await client.query('SELECT 1 FROM refresh_tokens WHERE id = $1', [id])).rowCount ===
              0,
            { message: 'the revoked token to be purged over TLS' },
          );
        },
        databaseUrl(DATABASE, server.url),
      );
      daemon.signal('SIGTERM');
      expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
    });
  });

  describe('a certificate signed by another authority', () => {
    const wrongAuthority = () =>
      tlsUrl({ sslmode: 'verify-full', sslrootcert: certificates.wrongCaFile });
    const explained = () =>
      new RegExp(
        `not signed by the certificate authority in sslrootcert=${certificates.wrongCaFile}.*PGSSLROOTCERT`,
      );

    it('is refused by the pool and install, saying which file to change', async () => {
      const failure = await withPool(wrongAuthority(), usesTls).then(
        () => expect.fail('the pool connected with the wrong authority'),
        (error: unknown) => error as Error,
      );
      expect(failure.message).to.match(explained());

      const install = await runCli(['install'], {
        DATABASE_URL: wrongAuthority(),
        PASSWORD_RESETS_TABLE: 'none',
      });
      expect(install.code).to.equal(1);
      expect(install.stdout + install.stderr).to.match(explained());
    });

    it('is refused by the listener', async () => {
      const client = new pg.Client(listenerConnectionConfig({ databaseUrl: wrongAuthority() }));
      client.on('error', () => undefined);
      const failure = await client.connect().then(
        () => expect.fail('the listener connected with the wrong authority'),
        (error: unknown) => error as Error & { code?: string },
      );
      expect(failure.code).to.match(/CERT|UNABLE_TO/);
    });
  });

  describe('a host name the certificate does not list', () => {
    // The certificate names 127.0.0.1 only; localhost reaches the same server.
    const byName = (sslmode: string) =>
      tlsUrl({ sslmode, sslrootcert: certificates.caFile }, 'localhost');

    it('is refused under verify-full, which checks the name', async () => {
      const failure = await withPool(byName('verify-full'), usesTls).then(
        () => expect.fail('verify-full accepted a certificate for another host'),
        (error: unknown) => error as Error,
      );
      expect(failure.message).to.match(
        /certificate is not for localhost.*sslmode=verify-full checks the host name/,
      );
    });

    it('is accepted under verify-ca, which checks the authority only', async () => {
      expect(await withPool(byName('verify-ca'), usesTls)).to.equal(true);
      const wrong = tlsUrl(
        { sslmode: 'verify-ca', sslrootcert: certificates.wrongCaFile },
        'localhost',
      );
      const failure = await withPool(wrong, usesTls).then(
        () => expect.fail('verify-ca accepted a certificate from another authority'),
        (error: unknown) => error as Error,
      );
      expect(failure.message).to.match(/not signed by the certificate authority/);
    });
  });
});
