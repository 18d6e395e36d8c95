// token-reaper as the benchmark runs it: the compiled build, installed and started with a
// purge source (PURGE_SOURCE), and known to be purging before anything is measured.
//
// The build is the compiled one, as the package's bin runs it, not the TypeScript sources under
// tsx: tsx's compiler adds about 40 MB to the process, which the peak RSS would otherwise charge
// to token-reaper, and a second of start-up to every `install`. src/ is compiled afresh into a
// temporary directory for the run (a stale dist/ would measure old code), beside links to
// package.json, sql/ and node_modules, which the build expects one level up. Node options on
// main.ts's `#!` line are passed on, as the bin would run them.
//
// A daemon is ready when it has deleted a canary: a token revoked after it started. That holds
// for every source without knowing its log events (LISTEN connected, slot streaming, first
// poll), and it proves the whole path, from the revoking commit to the row gone.
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, readFile, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';

import pg from 'pg';

import { repositoryRoot, spawnProcess, waitFor, type ProcessHandle } from '../support/cli.js';

import type { BenchDatabase } from './databases.js';
import { WORKLOAD_HASH_PREFIX } from './workload.js';

/** The values of PURGE_SOURCE. */
export const PURGE_SOURCES = ['notify', 'wal', 'poll'] as const;
export type PurgeSource = (typeof PURGE_SOURCES)[number];

const BUILD_TIMEOUT_MS = 5 * 60_000;
const INSTALL_TIMEOUT_MS = 10 * 60_000;
/** Bounds the wait for the canary; a daemon starts in about a second. */
const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 15_000;

export interface CompiledDaemon {
  /** dist/main.js of the fresh build. */
  readonly entryPoint: string;
  /** Node options on its `#!` line, which the bin runs with. */
  readonly nodeOptions: readonly string[];
  dispose(): Promise<void>;
}

/** `tsc -p tsconfig.build.json` into a temporary directory laid out like the package. */
export async function compileDaemon(): Promise<CompiledDaemon> {
  const directory = await mkdtemp(join(tmpdir(), 'token-reaper-bench-build-'));
  const dispose = () => rm(directory, { recursive: true, force: true });
  try {
    for (const name of ['package.json', 'sql', 'node_modules']) {
      await symlink(join(repositoryRoot, name), join(directory, name));
    }
    const compiler = spawnProcess(
      process.execPath,
      [
        join(repositoryRoot, 'node_modules', 'typescript', 'bin', 'tsc'),
        '-p',
        join(repositoryRoot, 'tsconfig.build.json'),
        '--outDir',
        join(directory, 'dist'),
        '--declaration',
        'false',
        '--sourceMap',
        'false',
      ],
      {},
      { label: 'tsc' },
    );
    const status = await within(compiler.exited, BUILD_TIMEOUT_MS);
    if (status?.code !== 0) {
      await compiler.kill();
      throw new Error(`compiling token-reaper failed\n${compiler.describeOutput()}`);
    }
    const entryPoint = join(directory, 'dist', 'main.js');
    const firstLine = (await readFile(entryPoint, 'utf8')).split('\n', 1)[0] ?? '';
    const nodeOptions = /^#!.*\bnode\b(.*)$/.exec(firstLine)?.[1]?.trim().split(/\s+/) ?? [];
    return { entryPoint, nodeOptions: nodeOptions.filter(Boolean), dispose };
  } catch (error) {
    await dispose();
    throw error;
  }
}

/** What every run of the build gets: the database, its one table, and no password resets. */
export function daemonEnvironment(
  database: BenchDatabase,
  table: string,
  extra: Readonly<Record<string, string>> = {},
): Record<string, string> {
  return {
    DATABASE_URL: database.url,
    REFRESH_TOKENS_TABLE: table,
    PASSWORD_RESETS_TABLE: 'none',
    ...extra,
  };
}

/**
 * The variables that select `source`. A `wal` slot gets a name of its own on every database:
 * slots belong to the server, so two copies must not share one, and one a crashed run left
 * behind must not be taken over.
 */
export function sourceEnvironment(source: PurgeSource): Record<string, string> {
  return source === 'wal'
    ? {
        PURGE_SOURCE: source,
        PURGE_WAL_SLOT: `token_reaper_bench_${randomBytes(4).toString('hex')}`,
      }
    : { PURGE_SOURCE: source };
}

export function spawnCompiled(
  build: CompiledDaemon,
  args: readonly string[],
  environment: Readonly<Record<string, string>>,
): ProcessHandle {
  return spawnProcess(
    process.execPath,
    [...build.nodeOptions, build.entryPoint, ...args],
    environment,
    {
      label: `token-reaper ${args.join(' ')}`,
    },
  );
}

/** `token-reaper install` with the daemon's environment, so PURGE_SOURCE decides what it makes. */
export async function install(
  build: CompiledDaemon,
  environment: Readonly<Record<string, string>>,
): Promise<void> {
  const child = spawnCompiled(build, ['install'], environment);
  const status = await within(child.exited, INSTALL_TIMEOUT_MS);
  if (status?.code !== 0) {
    await child.kill();
    throw new Error(
      `token-reaper install (PURGE_SOURCE=${environment['PURGE_SOURCE'] ?? 'notify'}) failed\n${child.describeOutput()}`,
    );
  }
}

export interface PurgeObjects {
  readonly trigger: boolean;
  readonly publication: boolean;
  readonly slot: boolean;
}

/** Which of a source's objects are in place for `table`: read to check a condition is what it says. */
export async function readPurgeObjects(
  database: BenchDatabase,
  table: string,
): Promise<PurgeObjects> {
  const [row] = await database.query<PurgeObjects>(
    `SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal
                      AND tgname NOT LIKE 'bench%') AS trigger,
            EXISTS (SELECT FROM pg_publication_rel WHERE prrelid = $1::regclass)
              OR EXISTS (SELECT FROM pg_publication WHERE puballtables) AS publication,
            EXISTS (SELECT FROM pg_replication_slots WHERE database = current_database())
              AS slot`,
    [table],
  );
  return row!;
}

/** What each source must have, and must not: `none` has neither trigger, publication nor slot. */
export function expectedObjects(source: PurgeSource | 'none'): PurgeObjects {
  return {
    trigger: source === 'notify',
    publication: source === 'wal',
    slot: source === 'wal',
  };
}

/**
 * Starts `token-reaper start` and waits until it has purged a canary. `revoke` revokes the
 * canary's id; the purge measurement passes its own, which records the revocation like any other.
 */
export async function startDaemon(
  build: CompiledDaemon,
  database: BenchDatabase,
  table: string,
  environment: Readonly<Record<string, string>>,
  revoke: (client: pg.ClientBase, id: string) => Promise<void> = (client, id) =>
    client.query(`UPDATE ${table} SET revoked = true WHERE id = $1`, [id]).then(() => undefined),
): Promise<ProcessHandle> {
  const daemon = spawnCompiled(build, ['start'], environment);
  try {
    await daemon.waitForLog('daemon.started', READY_TIMEOUT_MS);
    const client = new pg.Client({ connectionString: database.url });
    client.on('error', () => undefined);
    await client.connect();
    try {
      const inserted = await client.query<{ id: string }>(
        `INSERT INTO ${table} (user_id, token_hash, expires_at)
         VALUES ($1, $2, now() + interval '1 day') RETURNING id`,
        [randomUUID(), `${WORKLOAD_HASH_PREFIX}canary:${randomUUID()}`],
      );
      const id = inserted.rows[0]!.id;
      await revoke(client, id);
      await waitFor(
        async () => {
          if (daemon.child.exitCode !== null || daemon.child.signalCode !== null) {
            throw new Error(`token-reaper start exited\n${daemon.describeOutput()}`);
          }
          const left = await client.query(`SELECT 1 FROM ${table} WHERE id = $1`, [id]);
          return left.rowCount === 0;
        },
        { timeoutMs: READY_TIMEOUT_MS, intervalMs: 10, message: 'the daemon to purge a canary' },
      );
    } finally {
      await client.end().catch(() => undefined);
    }
    return daemon;
  } catch (error) {
    await daemon.kill();
    throw error;
  }
}

/** SIGTERM, and the exit code; SIGKILL when it does not stop in time (then null). */
export async function stopDaemon(daemon: ProcessHandle): Promise<number | null> {
  daemon.signal('SIGTERM');
  const stopped = await within(daemon.exited, STOP_TIMEOUT_MS);
  await daemon.kill();
  return stopped?.code ?? null;
}

/** VmHWM, the peak resident set, from /proc; null where there is no /proc. */
export async function readPeakRss(pid: number | undefined): Promise<number | null> {
  if (pid === undefined) return null;
  try {
    const status = await readFile(`/proc/${pid}/status`, 'utf8');
    const match = /^VmHWM:\s+(\d+)\s+kB$/m.exec(status);
    return match ? Number(match[1]) * 1024 : null;
  } catch {
    return null;
  }
}

/** `promise`, or null once `timeoutMs` has passed. */
async function within<T>(promise: Promise<T>, timeoutMs: number): Promise<T | null> {
  const timeout = new AbortController();
  try {
    return await Promise.race([promise, delay(timeoutMs, null, { signal: timeout.signal })]);
  } finally {
    timeout.abort();
  }
}
