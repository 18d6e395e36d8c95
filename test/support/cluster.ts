// Throwaway PostgreSQL clusters made with the machine's own server binaries (Debian's
// postgresql package, /usr/lib/postgresql/<major>/bin), for what the embedded server from npm
// cannot do: a streaming replica made with pg_basebackup -R, and a primary restarted as a
// standby and promoted again, as a failover does to it. Each cluster lives in a temporary
// directory on a free port, and dispose() stops it and removes it.
//
// As root, the binaries run as the `postgres` OS user, which initdb and postgres require.
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chown, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { findFreePort } from './embedded-server.js';

const run = promisify(execFile);
const SERVER_ROOT = '/usr/lib/postgresql';
const OS_USER = 'postgres';

export interface Cluster {
  /** Superuser URL (trust authentication), database `postgres`. */
  readonly url: string;
  readonly port: number;
  readonly dataDirectory: string;
  /** Stops it (fast), makes it a standby with standby.signal, and starts it in recovery. */
  restartAsStandby(): Promise<void>;
  /** Ends recovery: the standby becomes a primary. */
  promote(): Promise<void>;
  /**
   * A streaming replica of this cluster, made with pg_basebackup -R, started with `settings`
   * (`name=value`) on its command line.
   */
  replica(settings?: readonly string[]): Promise<Cluster>;
  dispose(): Promise<void>;
}

/** The newest server binaries on this machine, or null (the tests that need them skip). */
export async function serverBinaries(): Promise<string | null> {
  if (!existsSync(SERVER_ROOT)) return null;
  const majors = (await readdir(SERVER_ROOT)).filter((name) => /^\d+$/.test(name));
  const newest = majors.sort((a, b) => Number(b) - Number(a))[0];
  if (newest === undefined) return null;
  const bin = join(SERVER_ROOT, newest, 'bin');
  return existsSync(join(bin, 'pg_basebackup')) ? bin : null;
}

const asRoot = process.getuid?.() === 0;

/** Runs a server binary, as the postgres OS user when this process is root. */
async function runBinary(bin: string, program: string, args: readonly string[]) {
  const path = join(bin, program);
  const [command, commandArgs] = asRoot
    ? ['runuser', ['-u', OS_USER, '--', path, ...args]]
    : [path, [...args]];
  try {
    return await run(command, commandArgs, { cwd: tmpdir() });
  } catch (error) {
    const { stderr, stdout } = error as { stderr?: string; stdout?: string };
    throw new Error(`${program} ${args.join(' ')} failed: ${stderr ?? ''}${stdout ?? ''}`, {
      cause: error,
    });
  }
}

async function ownedDirectory(prefix: string) {
  const directory = await mkdtemp(join(tmpdir(), prefix));
  if (asRoot) {
    const { stdout } = await run('id', ['-u', OS_USER]);
    const { stdout: group } = await run('id', ['-g', OS_USER]);
    await chown(directory, Number(stdout.trim()), Number(group.trim()));
  }
  return directory;
}

/** A cluster's handle, and how to start it: a new one, or a replica after its base backup. */
function makeCluster(
  bin: string,
  dataDirectory: string,
  port: number,
  settings: readonly string[] = [],
): Cluster & { start(): Promise<unknown> } {
  const pgCtl = (...args: string[]) => runBinary(bin, 'pg_ctl', ['-D', dataDirectory, ...args]);
  let disposed = false;
  const cluster = {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    port,
    dataDirectory,
    // -w waits until it accepts connections, read-only ones for a standby.
    start: () =>
      pgCtl(
        '-o',
        [
          `-p ${port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=${dataDirectory} -c fsync=off`,
          ...settings.map((setting) => `-c ${setting}`),
        ].join(' '),
        '-l',
        join(dataDirectory, 'server.log'),
        '-w',
        '-t',
        '60',
        'start',
      ),
    async restartAsStandby() {
      await pgCtl('-m', 'fast', '-w', 'stop');
      const signal = join(dataDirectory, 'standby.signal');
      await writeFile(signal, '');
      if (asRoot) await run('chown', [OS_USER, signal]);
      await cluster.start();
    },
    async promote() {
      await pgCtl('-w', '-t', '60', 'promote');
    },
    async replica(replicaSettings: readonly string[] = []) {
      const replicaDirectory = await ownedDirectory('token-reaper-replica-');
      await runBinary(bin, 'pg_basebackup', [
        '-D',
        replicaDirectory,
        '-R',
        '-X',
        'stream',
        '-h',
        '127.0.0.1',
        '-p',
        String(port),
        '-U',
        'postgres',
      ]);
      const replica = makeCluster(bin, replicaDirectory, await findFreePort(), replicaSettings);
      await replica.start();
      return replica;
    },
    async dispose() {
      if (disposed) return;
      disposed = true;
      await pgCtl('-m', 'immediate', '-w', 'stop').catch(() => undefined);
      await rm(dataDirectory, { recursive: true, force: true });
    },
  };
  return cluster;
}

/**
 * A new primary, started, with `settings` (`name=value`) on its command line; null when the
 * machine has no server binaries.
 */
export async function createCluster(
  options: { settings?: readonly string[] } = {},
): Promise<Cluster | null> {
  const bin = await serverBinaries();
  if (bin === null) return null;
  const dataDirectory = await ownedDirectory('token-reaper-cluster-');
  await runBinary(bin, 'initdb', ['-D', dataDirectory, '-U', 'postgres', '--auth=trust', '-N']);
  const cluster = makeCluster(bin, dataDirectory, await findFreePort(), options.settings);
  await cluster.start();
  return cluster;
}
