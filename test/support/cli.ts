// Runs token-reaper as a real child process, the way operators run it: argv, environment,
// signals, JSON log lines on stdout and an exit code. Tests observe it through its logs and the
// database, waiting on events with deadlines rather than sleeping.
//
// Children start from a clean environment (PATH and HOME, plus what the test passes), so a
// developer's DATABASE_URL or PG* variables can never point a test at the wrong database.
//
// Every child is tracked until it exits. The root hooks in global.ts kill what a test left
// running, global teardown kills the rest, and a process 'exit' listener is the last resort, so
// a failing test never leaves an orphaned daemon behind.

import { spawn, type ChildProcess, type ChildProcessByStdio } from 'node:child_process';
import type { Readable } from 'node:stream';
import { setTimeout as delay } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

/** The repository root, where `src/main.ts` and `node_modules` live. */
export const repositoryRoot = fileURLToPath(new URL('../../', import.meta.url));

const ENTRY_POINT = 'src/main.ts';
const DEFAULT_LOG_TIMEOUT_MS = 15_000;
const DEFAULT_RUN_TIMEOUT_MS = 20_000;
/** How much of a child's output goes into an error message. */
const LOG_LINES_IN_ERRORS = 20;
const OUTPUT_CHARACTERS_IN_ERRORS = 4_000;

/** One JSON line the daemon logged (DESIGN.md, "Logs"). */
export interface LogLine {
  readonly timestamp: string;
  readonly level: string;
  readonly message: string;
  readonly event: string;
  readonly [field: string]: unknown;
}

/** An event name, or a predicate over log lines. */
export type LogMatcher = string | ((line: LogLine) => boolean);

/** Variables for the child on top of PATH, HOME and NODE_ENV=test; `undefined` removes one. */
export type ChildEnvironment = Readonly<Record<string, string | undefined>>;

export interface ExitStatus {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

export interface CliResult extends ExitStatus {
  readonly stdout: string;
  readonly stderr: string;
  readonly logs: readonly LogLine[];
}

export interface ProcessHandle {
  readonly child: ChildProcess;
  /** The JSON lines logged so far; grows as lines arrive. */
  readonly logs: readonly LogLine[];
  readonly stdout: string;
  readonly stderr: string;
  /** Settles once the process has exited and its output is read. Never rejects. */
  readonly exited: Promise<ExitStatus>;
  /**
   * The first log line that matches, counting lines already received at or after index `since`
   * (default 0; pass `handle.logs.length` to wait for a new one). Rejects when the process exits
   * first or after `timeoutMs`, with the last log lines and stderr in the message.
   */
  waitForLog(matcher: LogMatcher, timeoutMs?: number, since?: number): Promise<LogLine>;
  /** Sends a signal to this process only. False when it has already exited. */
  signal(name: NodeJS.Signals): boolean;
  /** SIGKILL, then waits for the exit. Safe to call after the process exited. */
  kill(): Promise<ExitStatus>;
  /** The last log lines, other stdout and stderr, for error messages. */
  describeOutput(): string;
}

const runningProcesses = new Set<ProcessHandle>();
let currentTestProcesses: Set<ProcessHandle> | undefined;

// The last resort: 'exit' listeners must be synchronous, and SIGKILL is what can be sent
// synchronously without waiting for an answer.
process.on('exit', () => {
  for (const handle of runningProcesses) handle.child.kill('SIGKILL');
});

/** Called by the root beforeEach hook: children spawned from now on belong to the current test. */
export function openChildProcessScope(): void {
  currentTestProcesses = new Set();
}

/** Called by the root afterEach hook: kills the current test's children that still run. */
export async function closeChildProcessScope(): Promise<void> {
  const scope = currentTestProcesses;
  currentTestProcesses = undefined;
  if (scope !== undefined) await Promise.all([...scope].map((handle) => handle.kill()));
}

/** Kills every child still running (global teardown). */
export async function killChildProcesses(): Promise<void> {
  await Promise.all([...runningProcesses].map((handle) => handle.kill()));
}

/** PATH and HOME from this process, NODE_ENV=test, then `environment` on top. */
export function cleanEnvironment(environment: ChildEnvironment = {}): NodeJS.ProcessEnv {
  const result: NodeJS.ProcessEnv = {};
  for (const name of ['PATH', 'HOME']) {
    const value = process.env[name];
    if (value !== undefined) result[name] = value;
  }
  result['NODE_ENV'] = 'test';
  for (const [name, value] of Object.entries(environment)) {
    if (value === undefined) delete result[name];
    else result[name] = value;
  }
  return result;
}

/** Starts `token-reaper <args>` from the TypeScript sources and returns at once. */
export function spawnDaemon(
  args: readonly string[],
  environment: ChildEnvironment = {},
): ProcessHandle {
  // The V8 flag the bin's shebang passes (src/main.ts), so that memory is measured as it runs.
  const nodeFlags = ['--max-semi-space-size=1', '--import', 'tsx'];
  return spawnProcess(process.execPath, [...nodeFlags, ENTRY_POINT, ...args], environment, {
    label: `token-reaper ${args.join(' ')}`.trim(),
  });
}

/** Runs `token-reaper <args>` to completion; kills it and rejects if it runs past `timeoutMs`. */
export async function runCli(
  args: readonly string[],
  environment: ChildEnvironment = {},
  options: { readonly timeoutMs?: number } = {},
): Promise<CliResult> {
  const handle = spawnDaemon(args, environment);
  const timeoutMs = options.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS;
  const deadline = new AbortController();
  const timedOut = delay(timeoutMs, 'timed out' as const, { signal: deadline.signal }).catch(
    () => 'exited' as const,
  );
  const outcome = await Promise.race([handle.exited, timedOut]);
  deadline.abort();
  if (outcome === 'timed out') {
    await handle.kill();
    throw new Error(
      `token-reaper ${args.join(' ')} did not exit within ${timeoutMs} ms\n${handle.describeOutput()}`,
    );
  }
  const status = await handle.exited;
  return { ...status, stdout: handle.stdout, stderr: handle.stderr, logs: [...handle.logs] };
}

interface LogWaiter {
  readonly matches: (line: LogLine) => boolean;
  readonly since: number;
  readonly description: string;
  resolve(line: LogLine): void;
  reject(error: Error): void;
}

/**
 * Spawns any command with the same tracking, log parsing and clean environment as spawnDaemon.
 * The harness tests use it with small Node scripts; tests of token-reaper use spawnDaemon.
 */
export function spawnProcess(
  command: string,
  args: readonly string[],
  environment: ChildEnvironment = {},
  options: {
    readonly label?: string;
    readonly cwd?: string;
    /** An IPC channel as a fourth stdio: child.send and the child's process.send. */
    readonly ipc?: boolean;
  } = {},
): ProcessHandle {
  const label = options.label ?? [command, ...args].join(' ');
  const child = spawn(command, args, {
    cwd: options.cwd ?? repositoryRoot,
    env: cleanEnvironment(environment),
    stdio: options.ipc === true ? ['ignore', 'pipe', 'pipe', 'ipc'] : ['ignore', 'pipe', 'pipe'],
  }) as ChildProcessByStdio<null, Readable, Readable>;

  const logs: LogLine[] = [];
  const otherStdoutLines: string[] = [];
  let stdout = '';
  let stderr = '';
  let partialLine = '';
  let exitStatus: ExitStatus | undefined;
  const waiters = new Set<LogWaiter>();

  const acceptLine = (line: string): void => {
    const parsed = parseLogLine(line);
    if (parsed === undefined) {
      if (line.trim() !== '') otherStdoutLines.push(line);
      return;
    }
    logs.push(parsed);
    const index = logs.length - 1;
    for (const waiter of waiters) {
      if (index >= waiter.since && waiter.matches(parsed)) {
        waiters.delete(waiter);
        waiter.resolve(parsed);
      }
    }
  };

  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (chunk: string) => {
    stdout += chunk;
    const lines = (partialLine + chunk).split('\n');
    partialLine = lines.pop() ?? '';
    for (const line of lines) acceptLine(line);
  });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => {
    stderr += chunk;
  });

  const describeOutput = (): string => {
    const lastLogs = logs.slice(-LOG_LINES_IN_ERRORS).map((line) => JSON.stringify(line));
    const parts = [
      `last ${lastLogs.length} of ${logs.length} log lines:`,
      ...lastLogs.map((line) => `  ${line}`),
    ];
    if (otherStdoutLines.length > 0) {
      parts.push('other stdout:', tail(otherStdoutLines.join('\n')));
    }
    parts.push(stderr === '' ? 'stderr: (empty)' : `stderr:\n${tail(stderr)}`);
    return parts.join('\n');
  };

  const exited = new Promise<ExitStatus>((resolve) => {
    const finish = (status: ExitStatus): void => {
      if (exitStatus !== undefined) return;
      if (partialLine !== '') acceptLine(partialLine);
      partialLine = '';
      exitStatus = status;
      runningProcesses.delete(handle);
      currentTestProcesses?.delete(handle);
      for (const waiter of waiters) {
        waiter.reject(
          new Error(
            `${label} exited (${describeExit(status)}) before logging ${waiter.description}\n${describeOutput()}`,
          ),
        );
      }
      waiters.clear();
      resolve(status);
    };
    // 'close' comes after the output streams end, so every log line has been seen by then.
    child.once('close', (code, signal) => finish({ code, signal }));
    // A spawn failure (a missing executable) emits 'error' and possibly no 'close'.
    child.once('error', (error) => {
      stderr += `\n[spawn error] ${error.message}`;
      if (child.pid === undefined) finish({ code: null, signal: null });
    });
  });

  const waitForLog = (
    matcher: LogMatcher,
    timeoutMs: number = DEFAULT_LOG_TIMEOUT_MS,
    since = 0,
  ): Promise<LogLine> => {
    const matches =
      typeof matcher === 'string' ? (line: LogLine) => line.event === matcher : matcher;
    const description =
      typeof matcher === 'string' ? `a "${matcher}" event` : 'a line matching the predicate';
    const found = logs.slice(since).find(matches);
    if (found !== undefined) return Promise.resolve(found);
    if (exitStatus !== undefined) {
      return Promise.reject(
        new Error(
          `${label} exited (${describeExit(exitStatus)}) without logging ${description}\n${describeOutput()}`,
        ),
      );
    }
    return new Promise<LogLine>((resolve, reject) => {
      const timer = setTimeout(() => {
        waiters.delete(waiter);
        reject(
          new Error(
            `${label} logged no ${description.replace(/^a /, '')} within ${timeoutMs} ms\n${describeOutput()}`,
          ),
        );
      }, timeoutMs);
      const waiter: LogWaiter = {
        matches,
        since,
        description,
        resolve: (line) => {
          clearTimeout(timer);
          resolve(line);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      waiters.add(waiter);
    });
  };

  const handle: ProcessHandle = {
    child,
    logs,
    get stdout() {
      return stdout;
    },
    get stderr() {
      return stderr;
    },
    exited,
    waitForLog,
    signal: (name) => exitStatus === undefined && child.kill(name),
    kill: async () => {
      if (exitStatus === undefined) child.kill('SIGKILL');
      return exited;
    },
    describeOutput,
  };
  runningProcesses.add(handle);
  currentTestProcesses?.add(handle);
  return handle;
}

function parseLogLine(line: string): LogLine | undefined {
  const trimmed = line.trim();
  if (!trimmed.startsWith('{')) return undefined;
  try {
    const value: unknown = JSON.parse(trimmed);
    return typeof value === 'object' && value !== null && !Array.isArray(value)
      ? (value as LogLine)
      : undefined;
  } catch {
    return undefined;
  }
}

function describeExit(status: ExitStatus): string {
  if (status.signal !== null) return `signal ${status.signal}`;
  return status.code === null ? 'failed to start' : `code ${status.code}`;
}

function tail(text: string): string {
  return text.length <= OUTPUT_CHARACTERS_IN_ERRORS
    ? text
    : `…${text.slice(-OUTPUT_CHARACTERS_IN_ERRORS)}`;
}

export interface WaitForOptions {
  /** Default 15 s. */
  readonly timeoutMs?: number;
  /** Time between checks; default 25 ms. */
  readonly intervalMs?: number;
  /** What was awaited, for the timeout error. */
  readonly message?: string;
  /**
   * Treat a thrown error as "not yet" and keep polling; the last one goes into the timeout
   * error. For checks that fail while a server restarts. Default false: an error ends the wait.
   */
  readonly retryErrors?: boolean;
}

/**
 * Polls `check` until it returns something other than undefined or false, and returns that.
 * Rejects after `timeoutMs`. The check runs once more at the deadline, so a slow check still
 * gets its last chance.
 */
export async function waitFor<T>(
  check: () => Promise<T | undefined | false> | T | undefined | false,
  options: WaitForOptions = {},
): Promise<T> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_LOG_TIMEOUT_MS;
  const intervalMs = options.intervalMs ?? 25;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    const outOfTime = Date.now() >= deadline;
    try {
      const result = await check();
      if (result !== undefined && result !== false) return result;
    } catch (error) {
      if (options.retryErrors !== true) throw error;
      lastError = error;
    }
    if (outOfTime) break;
    await delay(Math.min(intervalMs, Math.max(0, deadline - Date.now())));
  }
  const reason = lastError instanceof Error ? ` (last error: ${lastError.message})` : '';
  throw new Error(
    `timed out after ${timeoutMs} ms waiting for ${options.message ?? 'a condition'}${reason}`,
    { cause: lastError },
  );
}
