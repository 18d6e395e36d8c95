// SIGTERM and SIGINT reach the daemon when it runs the way the README says to run it: the
// installed bin executed directly (Docker's CMD ["node_modules/.bin/token-reaper","start"], or
// `exec` in a shell script), so that the daemon is the process the supervisor signals. The
// package is built into a temporary project with the repository's own node_modules linked in,
// as `npm install <path>` would link it; nothing is fetched.
//
// Under npx it is npm's process that gets the signal. npm forwards SIGTERM and SIGINT to the
// shell it runs the bin through (`sh -c`), and where sh is dash that shell dies without passing
// them on, leaving the daemon running; where npm runs the daemon directly, a Ctrl-C reaches it
// twice. The last tests prove the daemon's safety nets for both (src/cli.ts, `start`).
//
// Each run gets a process group of its own, like a terminal's foreground job or a container, and
// the tests look in /proc for anything of it left running, so they run on Linux only.

import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect } from 'chai';
import {
  cleanEnvironment,
  repositoryRoot,
  runCli,
  waitFor,
  type ChildEnvironment,
  type ExitStatus,
  type LogLine,
} from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

const BIN = 'node_modules/.bin/token-reaper';
const BUILD_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 15_000;

interface Run {
  readonly child: ChildProcess;
  /** The process group: the spawned process leads it, and everything it starts stays in it. */
  readonly group: number;
  readonly logs: readonly LogLine[];
  /** The spawned process's own exit. */
  readonly exited: Promise<ExitStatus>;
  /** Stdout closed: every process that held it, the daemon included, has gone. */
  readonly drained: Promise<void>;
  describe(): string;
}

const runs = new Set<Run>();

function killGroup(run: Run): void {
  try {
    process.kill(-run.group, 'SIGKILL');
  } catch {
    // ESRCH: the group has gone.
  }
}

// The last resort, as in support/cli.ts: a failing run must not leave a daemon behind.
process.on('exit', () => runs.forEach(killGroup));

/** Starts `command` in `cwd` in a process group of its own, from a clean environment. */
function startRun(
  command: string,
  args: readonly string[],
  cwd: string,
  environment: ChildEnvironment,
): Run {
  const child = spawn(command, args, {
    cwd,
    env: cleanEnvironment(environment),
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  const logs: LogLine[] = [];
  let stdout = '';
  let stderr = '';
  let partialLine = '';
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    stdout += chunk;
    const lines = (partialLine + chunk).split('\n');
    partialLine = lines.pop() ?? '';
    for (const line of lines) {
      if (!line.startsWith('{')) continue;
      try {
        logs.push(JSON.parse(line) as LogLine);
      } catch {
        // npm's own output, not a log line.
      }
    }
  });
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const run: Run = {
    child,
    group: child.pid!,
    logs,
    exited: new Promise((resolve) =>
      child.once('exit', (code, signal) => resolve({ code, signal })),
    ),
    drained: new Promise((resolve) => child.stdout!.once('close', () => resolve())),
    describe: () => `stdout:\n${stdout.slice(-4000)}\nstderr:\n${stderr.slice(-4000)}`,
  };
  runs.add(run);
  return run;
}

async function waitForEvent(run: Run, event: string): Promise<LogLine> {
  return waitFor(() => run.logs.find((line) => line.event === event), {
    timeoutMs: STOP_TIMEOUT_MS,
    message: `${event} in the logs`,
  }).catch((error: Error) => {
    throw new Error(`${error.message}\n${run.describe()}`);
  });
}

interface ProcessEntry {
  readonly pid: number;
  readonly ppid: number;
  readonly pgid: number;
  readonly command: string;
}

/** Live processes (not zombies) from /proc, each with its parent, group and command line. */
async function listProcesses(): Promise<ProcessEntry[]> {
  const found: ProcessEntry[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = await readFile(`/proc/${name}/stat`, 'utf8');
      const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8');
      // After "pid (comm) ": state, ppid, pgrp. comm may hold spaces and parentheses.
      const [state, ppid, pgid] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (state === 'Z') continue;
      const command = cmdline.split('\0').join(' ').trim();
      found.push({ pid: Number(name), ppid: Number(ppid), pgid: Number(pgid), command });
    } catch {
      // It exited while we looked.
    }
  }
  return found;
}

/** What is running of `run`: its process group, and any token-reaper of `project` elsewhere. */
async function processesOf(run: Run, project: string): Promise<ProcessEntry[]> {
  return (await listProcesses()).filter(
    (entry) => entry.pgid === run.group || entry.command.includes(`${project}/${BIN}`),
  );
}

function formatProcesses(entries: readonly ProcessEntry[]): string {
  return entries.map((e) => `  ${e.pid} ppid ${e.ppid} pgid ${e.pgid}: ${e.command}`).join('\n');
}

async function expectNothingLeft(run: Run, project: string): Promise<void> {
  await waitFor(async () => (await processesOf(run, project)).length === 0, {
    timeoutMs: STOP_TIMEOUT_MS,
    message: 'every process of the run to exit',
  }).catch(async (error: Error) => {
    const left = formatProcesses(await processesOf(run, project));
    throw new Error(`${error.message}; still running:\n${left}\n${run.describe()}`);
  });
  await run.drained;
}

/** The daemon stopped the graceful way: one stop, then `daemon.stopped`, nothing forced. */
function expectGracefulStop(run: Run): void {
  const events = run.logs.map((line) => line.event);
  expect(
    events.filter((event) => event === 'daemon.stopping'),
    run.describe(),
  ).to.have.length(1);
  expect(events, run.describe()).to.include('daemon.stopped');
  expect(events, run.describe()).not.to.include('daemon.stop_timeout');
}

/**
 * A project in a temporary directory with token-reaper installed in node_modules, as npm installs
 * it: the package's directory with dist/ built from src/ (by the repository's tsc), sql/ and
 * package.json, and the bin linked into node_modules/.bin. The package's own dependencies
 * resolve through a link to the repository's node_modules.
 */
async function createProject(): Promise<string> {
  const project = await mkdtemp(join(tmpdir(), 'token-reaper-signals-'));
  try {
    await installPackage(project);
  } catch (error) {
    await rm(project, { recursive: true, force: true });
    throw error;
  }
  return project;
}

async function installPackage(project: string): Promise<void> {
  const pkg = join(project, 'node_modules', 'token-reaper');
  await mkdir(join(project, 'node_modules', '.bin'), { recursive: true });
  await mkdir(pkg);
  await promisify(execFile)(
    process.execPath,
    [
      join(repositoryRoot, 'node_modules', 'typescript', 'bin', 'tsc'),
      '-p',
      'tsconfig.build.json',
      '--outDir',
      join(pkg, 'dist'),
      '--declaration',
      'false',
      '--sourceMap',
      'false',
    ],
    { cwd: repositoryRoot, timeout: BUILD_TIMEOUT_MS },
  ).catch((error: Error & { stdout?: string }) => {
    throw new Error(`building the package failed: ${error.message}\n${error.stdout ?? ''}`);
  });
  for (const name of ['package.json', 'sql', 'node_modules']) {
    await symlink(join(repositoryRoot, name), join(pkg, name));
  }
  // npm makes the bin executable when it links it.
  await chmod(join(pkg, 'dist', 'main.js'), 0o755);
  await symlink('../token-reaper/dist/main.js', join(project, BIN));
  await writeFile(
    join(project, 'package.json'),
    JSON.stringify({ name: 'signals-test', private: true, dependencies: { 'token-reaper': '*' } }),
  );
}

describe('signals to the installed daemon', function () {
  this.timeout(60_000);
  const database = useTestDatabase('signals');
  let project: string | undefined;
  let environment: ChildEnvironment;

  before(async function () {
    if (process.platform !== 'linux') this.skip();
    this.timeout(BUILD_TIMEOUT_MS + 30_000);
    await createReferenceSchema(database.current, { passwordResetsTable: null });
    environment = { DATABASE_URL: database.url, PASSWORD_RESETS_TABLE: 'none' };
    const install = await runCli(['install'], environment);
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    project = await createProject();
  });

  afterEach(async function () {
    for (const run of runs) {
      killGroup(run);
      await run.exited;
      runs.delete(run);
    }
  });

  after(async function () {
    if (project !== undefined) await rm(project, { recursive: true, force: true });
  });

  const ways = [
    { name: 'the bin run directly', command: () => join(project!, BIN), args: ['start'] },
    {
      name: '`exec` of the bin in a shell script',
      command: () => 'sh',
      args: ['-c', `exec ${BIN} start`],
    },
  ];
  const signals = [
    {
      name: 'SIGTERM to the process',
      signal: 'SIGTERM',
      send: (run: Run) => run.child.kill('SIGTERM'),
    },
    {
      name: 'SIGINT to its process group, as Ctrl-C sends it',
      signal: 'SIGINT',
      send: (run: Run) => process.kill(-run.group, 'SIGINT'),
    },
  ] as const;

  for (const way of ways) {
    for (const { name, signal, send } of signals) {
      it(`${way.name}: ${name} stops it gracefully, exit 0, nothing left running`, async () => {
        const run = startRun(way.command(), way.args, project!, environment);
        await waitForEvent(run, 'daemon.started');
        // The daemon is the process that was started, with nothing in between.
        const running = await processesOf(run, project!);
        expect(
          running.map((entry) => entry.pid),
          formatProcesses(running),
        ).to.deep.equal([run.child.pid]);
        expect(running[0]!.command).to.match(
          /^node --max-semi-space-size=1 .*\.bin\/token-reaper start$/,
        );

        send(run);
        expect(await run.exited, run.describe()).to.deep.equal({ code: 0, signal: null });
        await expectNothingLeft(run, project!);
        expectGracefulStop(run);
        expect(run.logs.find((line) => line.event === 'daemon.stopping')).to.include({ signal });
      });
    }
  }

  describe('under npx, the safety nets', () => {
    const npx = (scriptShell: string) =>
      startRun(
        'npx',
        ['--no', '--offline', `--script-shell=${scriptShell}`, 'token-reaper', 'start'],
        project!,
        environment,
      );

    it('SIGTERM to npx alone (docker stop, kill $PID): the daemon stops gracefully even where the shell between them drops it', async () => {
      const run = npx('sh');
      await waitForEvent(run, 'daemon.started');
      const daemon = (await processesOf(run, project!)).find((entry) =>
        entry.command.includes(BIN),
      );
      expect(daemon, run.describe()).not.to.equal(undefined);

      run.child.kill('SIGTERM');
      // npm's exit code is npm's: 143 when it re-raises SIGTERM after its shell died of it.
      await run.exited;
      await expectNothingLeft(run, project!);
      expectGracefulStop(run);
      const stopping = run.logs.find((line) => line.event === 'daemon.stopping')!;
      if (daemon!.ppid !== run.child.pid) {
        // There was a shell between npm and the daemon (dash): the shell died of the SIGTERM and
        // the daemon stopped because its parent had gone.
        expect(stopping, run.describe()).to.include({ parentPid: daemon!.ppid });
      }
    });

    it('Ctrl-C where npm runs the daemon directly and forwards the SIGINT it also got: one graceful stop, exit 0', async function () {
      if (!existsSync('/bin/bash')) this.skip();
      // bash runs `sh -c`'s one command by exec, so the daemon is npm's child (sh is bash on
      // Fedora and macOS); npm then forwards the terminal's SIGINT a few milliseconds after it.
      const run = npx('bash');
      await waitForEvent(run, 'daemon.started');
      const running = await processesOf(run, project!);
      const children = running.filter((entry) => entry.ppid === run.child.pid);
      expect(children, formatProcesses(running)).to.have.length(1);
      expect(children[0]!.command, formatProcesses(running)).to.include(BIN);

      process.kill(-run.group, 'SIGINT');
      expect(await run.exited, run.describe()).to.deep.equal({ code: 0, signal: null });
      await expectNothingLeft(run, project!);
      expectGracefulStop(run);
    });
  });
});
