// Databases for tests. One PostgreSQL server serves the whole run (global.ts provisions it and
// publishes its superuser URL in TOKEN_REAPER_TEST_SERVER_URL); every test file or block gets a
// database of its own on it, so tests never see each other's rows, triggers or LISTENs.
//
// Like pg-boss, a block's database is dropped only when everything in the block passed: after a
// failure it stays, and its URL goes to stderr, so the rows the test saw can be inspected.
//
// Fault tests that stop and start PostgreSQL cannot do that to the shared server; they get a
// server of their own from startOwnedServer().

import { randomBytes } from 'node:crypto';

import pg from 'pg';
import { redactUrl } from '../../src/redact.js';

import { createCluster } from './cluster.js';
import { startEmbeddedServer } from './embedded-server.js';

/** The variable global.ts sets for the test files, which run in the same process. */
export const SERVER_URL_VARIABLE = 'TOKEN_REAPER_TEST_SERVER_URL';

/** PostgreSQL's limit on identifiers (NAMEDATALEN - 1). */
const MAXIMUM_IDENTIFIER_BYTES = 63;
const TEST_DATABASE_POOL_SIZE = 5;

const keptDatabases: string[] = [];

/** Databases that useTestDatabase kept after a failure in this run. */
export function keptDatabaseNames(): readonly string[] {
  return keptDatabases;
}

/** The superuser URL of the run's server, connected to the database `postgres`. */
export function serverUrl(): string {
  const url = process.env[SERVER_URL_VARIABLE];
  if (url === undefined || url === '') {
    throw new Error(
      `${SERVER_URL_VARIABLE} is not set. Run the tests through mocha (npm test): ` +
        'its global setup in test/support/global.ts provisions the server.',
    );
  }
  return url;
}

/** The URL with any password (in the user part or a `password` parameter) replaced by `***`. */
export function maskPassword(url: string): string {
  // Printing an unparseable string could print a password; say nothing about it instead.
  if (!URL.canParse(url)) return '<a database URL that does not parse>';
  return redactUrl(url);
}

/** The server URL with its database replaced by `database`. */
export function databaseUrl(database: string, server: string = serverUrl()): string {
  const parsed = new URL(server);
  parsed.pathname = `/${encodeURIComponent(database)}`;
  return parsed.toString();
}

/** Runs `work` on a fresh superuser connection to the server's `postgres` database. */
export async function withServerClient<T>(
  work: (client: pg.Client) => Promise<T>,
  url: string = serverUrl(),
): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  // A connection-level error (the server going away) also rejects the query in flight; without
  // a listener the same error would be thrown again as an uncaught 'error' event.
  client.on('error', () => undefined);
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

export interface TestDatabase {
  readonly name: string;
  /** Superuser URL of this database; it carries the password, so print it through maskPassword. */
  readonly url: string;
  /** Up to five connections to this database. */
  readonly pool: pg.Pool;
  /** Runs one statement on the pool and returns its rows. */
  query<Row extends pg.QueryResultRow = pg.QueryResultRow>(
    text: string,
    parameters?: readonly unknown[],
  ): Promise<Row[]>;
  /** Ends the pool and keeps the database. Safe to call twice. */
  end(): Promise<void>;
  /** Ends the pool and drops the database, terminating any other session in it. Safe to call twice. */
  drop(): Promise<void>;
}

/**
 * A database name from `label`: lowercase letters, digits and underscores, then a random suffix,
 * at most 63 bytes so PostgreSQL never truncates it (which could make two names collide).
 */
export function uniqueDatabaseName(label: string): string {
  const suffix = randomBytes(5).toString('hex');
  const prefix = 'test_';
  const room = MAXIMUM_IDENTIFIER_BYTES - prefix.length - suffix.length - 1;
  const safeLabel = label
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '_')
    .replace(/^_+|_+$/g, '')
    .slice(0, room)
    .replace(/_+$/, '');
  return safeLabel === '' ? `${prefix}${suffix}` : `${prefix}${safeLabel}_${suffix}`;
}

export async function createTestDatabase(
  label: string,
  server: string = serverUrl(),
): Promise<TestDatabase> {
  const name = uniqueDatabaseName(label);
  await withServerClient(
    (client) => client.query(`CREATE DATABASE ${pg.escapeIdentifier(name)}`),
    server,
  );

  const url = databaseUrl(name, server);
  const pool = new pg.Pool({ connectionString: url, max: TEST_DATABASE_POOL_SIZE });
  // Fault tests terminate backends on purpose, and drop() terminates the rest; an idle pooled
  // client that loses its backend emits 'error' on the pool, which would otherwise crash mocha.
  // The pool discards that client by itself, so there is nothing else to do.
  pool.on('error', () => undefined);

  let ended: Promise<void> | undefined;
  let dropped: Promise<void> | undefined;
  const end = (): Promise<void> => (ended ??= pool.end());
  return {
    name,
    url,
    pool,
    async query<Row extends pg.QueryResultRow = pg.QueryResultRow>(
      text: string,
      parameters?: readonly unknown[],
    ): Promise<Row[]> {
      const result = await pool.query<Row>(text, parameters as unknown[] | undefined);
      return result.rows;
    },
    end,
    drop: () =>
      (dropped ??= (async () => {
        await end();
        await withServerClient(
          (client) =>
            client.query(`DROP DATABASE IF EXISTS ${pg.escapeIdentifier(name)} WITH (FORCE)`),
          server,
        );
      })()),
  };
}

/** What useTestDatabase returns: the block's database, once its `before` hook has run. */
export type TestDatabaseHandle = Pick<TestDatabase, 'name' | 'url' | 'pool' | 'query'> & {
  readonly current: TestDatabase;
};

/**
 * Call inside a `describe`: creates one database for the block in a `before` hook and drops it in
 * an `after` hook, unless a test or hook in the block failed. Call it before the block's own
 * hooks so that they can use the database.
 */
export function useTestDatabase(
  label: string,
  options: {
    /** The server's superuser URL, read in the `before` hook; default the run's server. */
    server?: () => string;
  } = {},
): TestDatabaseHandle {
  let database: TestDatabase | undefined;
  let sawFailure = false;

  before(`create test database "${label}"`, async function () {
    database = await createTestDatabase(label, options.server?.());
  });

  afterEach(function () {
    // A test whose beforeEach hook failed never gets a state; it did not pass either.
    const test = this.currentTest;
    if (test && !test.isPending() && test.state !== 'passed') sawFailure = true;
  });

  after(`drop test database "${label}"`, async function () {
    if (database === undefined) return;
    if (sawFailure || suiteHasFailure(this.test?.parent)) {
      await database.end();
      keptDatabases.push(database.name);
      console.error(
        `kept test database ${database.name} after a failure in "${this.test?.parent?.fullTitle() ?? label}": ` +
          `${maskPassword(database.url)} (drop it with: DROP DATABASE ${database.name} WITH (FORCE))`,
      );
    } else {
      await database.drop();
    }
  });

  const current = (): TestDatabase => {
    if (database === undefined) {
      throw new Error(
        `the test database "${label}" does not exist yet: use it in tests or hooks, not while defining them`,
      );
    }
    return database;
  };
  return {
    get current() {
      return current();
    },
    get name() {
      return current().name;
    },
    get url() {
      return current().url;
    },
    get pool() {
      return current().pool;
    },
    query: (text, parameters) => current().query(text, parameters),
  };
}

/**
 * Whether any test or hook in the suite or below it failed. Mocha marks a failed hook with
 * `state = 'failed'` but lists hooks only in private fields, which have kept these names for
 * years; if they ever vanish, this degrades to looking at tests only.
 */
function suiteHasFailure(suite: Mocha.Suite | undefined): boolean {
  if (suite === undefined) return false;
  const hookLists = suite as unknown as Record<
    '_beforeAll' | '_beforeEach' | '_afterEach' | '_afterAll',
    Mocha.Hook[] | undefined
  >;
  const hooks = [
    ...(hookLists._beforeAll ?? []),
    ...(hookLists._beforeEach ?? []),
    ...(hookLists._afterEach ?? []),
    ...(hookLists._afterAll ?? []),
  ];
  return (
    suite.tests.some((test) => test.state === 'failed') ||
    hooks.some((hook) => hook.state === 'failed') ||
    suite.suites.some(suiteHasFailure)
  );
}

/** A server with wal_level=logical, for PURGE_SOURCE=wal; see startLogicalServer. */
export interface LogicalServer {
  readonly url: string;
  /** Where it comes from, for the test log. */
  readonly source: string;
  dispose(): Promise<void>;
}

/**
 * A server of the caller's own with wal_level=logical and `max_slot_wal_keep_size` bound,
 * for PURGE_SOURCE=wal, whatever server the run uses (the local one may have
 * wal_level=replica, which the tests must not change). A run on TEST_DATABASE_URL (the second
 * major version) gets a throwaway cluster of the machine's own server binaries, so that `wal`
 * is tested on that version too; a run without, or a machine without them, the embedded one.
 */
export async function startLogicalServer(settings: readonly string[] = []): Promise<LogicalServer> {
  const all = ['wal_level=logical', 'max_slot_wal_keep_size=256MB', ...settings];
  if (process.env['TEST_DATABASE_URL'] !== undefined) {
    const cluster = await createCluster({ settings: all });
    if (cluster !== null) {
      return { url: cluster.url, source: 'a throwaway cluster', dispose: () => cluster.dispose() };
    }
  }
  const owned = await startOwnedServer({ settings: all });
  return { url: owned.url, source: 'an embedded server', dispose: () => owned.dispose() };
}

/**
 * Call inside a `describe`: a logical server for the block (startLogicalServer). Returns its
 * superuser URL once the `before` hook has run.
 */
export function useLogicalServer(): () => string {
  let server: LogicalServer | undefined;
  before('start a server with wal_level=logical', async function () {
    this.timeout(120_000);
    server = await startLogicalServer();
  });
  after('stop the wal_level=logical server', async () => {
    await server?.dispose();
  });
  return () => {
    if (server === undefined) throw new Error('the logical server is not started yet');
    return server.url;
  };
}

/** A PostgreSQL server that one test owns, so it may stop and start it. */
export interface OwnedServer {
  /** Superuser URL, connected to the database `postgres`. Stays the same across restarts. */
  readonly url: string;
  /** Where its data lives, until dispose() removes it. */
  readonly dataDirectory: string;
  /** Fast shutdown: sessions are terminated, the data stays. */
  stop(): Promise<void>;
  /** Starts the stopped server again on the same data directory and port. */
  start(): Promise<void>;
  /** Stops the server and deletes its data. Safe to call twice. */
  dispose(): Promise<void>;
}

const ownedServers = new Set<OwnedServer>();

/**
 * Starts a dedicated embedded PostgreSQL (about a second) on its own port and data directory.
 * Dispose of it in an `after` hook; global teardown disposes of any that are left.
 */
export async function startOwnedServer(
  options: { settings?: readonly string[] } = {},
): Promise<OwnedServer> {
  const embedded = await startEmbeddedServer({ persistent: true, settings: options.settings });
  const owned: OwnedServer = {
    url: embedded.url,
    dataDirectory: embedded.dataDirectory,
    stop: () => embedded.stop(),
    start: () => embedded.start(),
    dispose: async () => {
      ownedServers.delete(owned);
      await embedded.dispose();
    },
  };
  ownedServers.add(owned);
  return owned;
}

/** Global teardown's safety net for owned servers a test did not dispose of. */
export async function disposeOwnedServers(): Promise<void> {
  await Promise.all([...ownedServers].map((server) => server.dispose()));
}
