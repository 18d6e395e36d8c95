// A PgBouncer of the test's own, in transaction mode, in front of the run's server: the pooler a
// deployment puts between token-reaper and PostgreSQL. Debian's package provides it (CI installs
// it in .ci/run); where it is missing, the tests that need it are skipped, saying why.
//
// Its configuration leaves ignore_startup_parameters empty on purpose: a client that sends a
// startup parameter such as statement_timeout is refused, as by a stock PgBouncer. Every client
// logs in as the server's user (auth_type=any), so the tests need no user list.

import { execFileSync } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';

import pg from 'pg';

import { spawnProcess, waitFor, type ProcessHandle } from './cli.js';
import { findFreePort } from './embedded-server.js';

/** Debian installs it in /usr/sbin, which is not on every user's PATH. */
const EXTRA_DIRECTORIES = ['/usr/sbin', '/usr/local/sbin'];
const START_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 5_000;

/** The pgbouncer executable, or null when it is not installed. */
export function findPgBouncer(): string | null {
  const directories = [...(process.env['PATH'] ?? '').split(delimiter), ...EXTRA_DIRECTORIES];
  for (const directory of directories) {
    if (directory === '') continue;
    const candidate = join(directory, 'pgbouncer');
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // Not here.
    }
  }
  return null;
}

export const PGBOUNCER_MISSING =
  'pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)';

export interface PgBouncerOptions {
  /** Server connections per database and user (default_pool_size); default 2. */
  readonly poolSize?: number;
}

export interface PgBouncer {
  readonly port: number;
  /** The URL of `database` through PgBouncer. */
  url(database: string): string;
  /** Runs a console command (SHOW CLIENTS, SHOW SERVERS…) and returns its rows. */
  console(command: string): Promise<Record<string, string | null>[]>;
  /** Its output so far, for error messages. */
  describeOutput(): string;
  /** Stops it and removes its files. Safe to call twice. */
  stop(): Promise<void>;
}

/** Starts PgBouncer in front of the server at `serverUrl` and waits until it forwards a query. */
export async function startPgBouncer(
  executable: string,
  serverUrl: string,
  options: PgBouncerOptions = {},
): Promise<PgBouncer> {
  const server = new URL(serverUrl);
  const user = decodeURIComponent(server.username) || 'postgres';
  const port = await findFreePort();
  const directory = await mkdtemp(join(tmpdir(), 'token-reaper-pgbouncer-'));
  const configFile = join(directory, 'pgbouncer.ini');
  const connection = [
    `host=${server.searchParams.get('host') ?? server.hostname.replace(/^\[(.*)\]$/, '$1')}`,
    `port=${server.port || '5432'}`,
    `user=${quote(user)}`,
    ...(server.password === '' ? [] : [`password=${quote(decodeURIComponent(server.password))}`]),
  ].join(' ');
  await writeFile(
    configFile,
    [
      '[databases]',
      `* = ${connection}`,
      '[pgbouncer]',
      'listen_addr = 127.0.0.1',
      `listen_port = ${port}`,
      'unix_socket_dir =',
      'auth_type = any',
      'pool_mode = transaction',
      `default_pool_size = ${options.poolSize ?? 2}`,
      'max_client_conn = 500',
      '',
    ].join('\n'),
  );
  // PgBouncer refuses to run as root ("PgBouncer should not run as root"); -u drops to a user,
  // who must be able to read the configuration.
  const asRoot = process.getuid?.() === 0;
  if (asRoot) {
    await chmod(directory, 0o755);
    await chmod(configFile, 0o644);
  }
  const runAs = asRoot ? ['-u', unprivilegedUser()] : [];
  const child = spawnProcess(executable, [...runAs, configFile], {}, { label: 'pgbouncer' });

  const url = (database: string) =>
    `postgres://${encodeURIComponent(user)}@127.0.0.1:${port}/${encodeURIComponent(database)}`;
  let stopped: Promise<void> | undefined;
  const bouncer: PgBouncer = {
    port,
    url,
    console: async (command) => {
      const client = new pg.Client({ connectionString: url('pgbouncer') });
      client.on('error', () => undefined);
      await client.connect();
      try {
        return (await client.query<Record<string, string | null>>(command)).rows;
      } finally {
        await client.end();
      }
    },
    describeOutput: () => child.describeOutput(),
    stop: () =>
      (stopped ??= (async () => {
        await stopProcess(child);
        await rm(directory, { recursive: true, force: true });
      })()),
  };

  try {
    await waitFor(
      async () => {
        if (child.child.exitCode !== null) {
          throw new Error(`pgbouncer exited\n${child.describeOutput()}`);
        }
        const client = new pg.Client({ connectionString: url(server.pathname.slice(1) || user) });
        client.on('error', () => undefined);
        try {
          await client.connect();
          await client.query('SELECT 1');
          return true;
        } catch (error) {
          if (child.child.exitCode !== null) throw error;
          return false;
        } finally {
          await client.end().catch(() => undefined);
        }
      },
      { timeoutMs: START_TIMEOUT_MS, message: `pgbouncer to forward a query on port ${port}` },
    );
  } catch (error) {
    await bouncer.stop();
    throw error;
  }
  return bouncer;
}

/** A PgBouncer connection-string value, single-quoted. */
function quote(value: string): string {
  return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
}

/** The user that root runs PgBouncer as: `postgres`, which Debian's packages create. */
function unprivilegedUser(): string {
  try {
    execFileSync('id', ['-u', 'postgres'], { stdio: 'ignore' });
    return 'postgres';
  } catch {
    return 'nobody';
  }
}

/** SIGTERM (PgBouncer's immediate shutdown), then SIGKILL after a deadline. */
async function stopProcess(child: ProcessHandle): Promise<void> {
  if (!child.signal('SIGTERM')) return;
  const timer = setTimeout(() => void child.kill(), STOP_TIMEOUT_MS);
  try {
    await child.exited;
  } finally {
    clearTimeout(timer);
  }
}
