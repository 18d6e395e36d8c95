// token-reaper as a child process, observed the way an operator would: JSON log lines on stdout
// (DESIGN.md, "Logs"), signals in, an exit code out.
//
// test/support/cli.ts has a helper like this for the tests, but the demo needs one thing it
// lacks: the daemon runs in a process group of its own (`detached`). A Ctrl-C in a terminal
// signals the whole foreground group; the daemon would get SIGINT from the terminal and SIGTERM
// from the demo, and it treats a second stop signal as "force exit now". Detached, it only
// hears from the demo, which stops it with exactly one SIGTERM.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

import {
  cleanEnvironment,
  repositoryRoot,
  type ChildEnvironment,
  type ExitStatus,
  type LogLine,
} from '../test/support/cli.js';

/** The contract gives a graceful stop 10 s; past that the demo stops waiting. */
const STOP_LIMIT_MS = 12_000;
const WAIT_LIMIT_MS = 30_000;

export interface DaemonProcess {
  readonly pid: number;
  /** Every JSON line logged so far. */
  readonly logs: readonly LogLine[];
  readonly exited: Promise<ExitStatus>;
  /**
   * The first line, at index `since` or later, whose event is one of `events`. Rejects when the
   * daemon exits first, or after `timeoutMs`.
   */
  waitFor(
    events: string | readonly string[],
    options?: { since?: number; timeoutMs?: number },
  ): Promise<LogLine>;
  signal(name: NodeJS.Signals): void;
  /** One SIGTERM, then the exit status; SIGKILL if the stop outlives its limit. Idempotent. */
  stop(): Promise<ExitStatus>;
}

/**
 * Starts `token-reaper <args>` from the sources, in a clean environment (PATH, HOME and
 * NODE_ENV=test, plus `environment`), and hands every output line to `onLine` as it arrives.
 */
export function startDaemon(
  args: readonly string[],
  environment: ChildEnvironment,
  onLine: (stream: 'stdout' | 'stderr', line: string) => void,
): DaemonProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/main.ts', ...args], {
    cwd: repositoryRoot,
    env: cleanEnvironment(environment),
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  const logs: LogLine[] = [];
  const waiters = new Set<{ check: () => void; fail: (why: string) => void }>();
  let status: ExitStatus | undefined;

  createInterface({ input: child.stdout }).on('line', (line) => {
    onLine('stdout', line);
    const parsed = parseLogLine(line);
    if (parsed === undefined) return;
    logs.push(parsed);
    for (const waiter of waiters) waiter.check();
  });
  createInterface({ input: child.stderr }).on('line', (line) => onLine('stderr', line));

  const exited = new Promise<ExitStatus>((resolve) => {
    // 'close' comes after the output streams end, so every line has been seen by then.
    child.once('close', (code, signal) => {
      status = { code, signal };
      for (const waiter of waiters) waiter.fail(`the daemon exited (${describeExit(status)})`);
      resolve(status);
    });
    child.once('error', (error) => {
      if (child.pid !== undefined) return;
      status = { code: null, signal: null };
      for (const waiter of waiters) waiter.fail(`the daemon did not start: ${error.message}`);
      resolve(status);
    });
  });
  // The last resort when the demo itself dies: a detached child would otherwise outlive it.
  process.on('exit', () => {
    if (status === undefined) child.kill('SIGKILL');
  });

  const waitFor: DaemonProcess['waitFor'] = (events, options = {}) => {
    const wanted = typeof events === 'string' ? [events] : events;
    const description = wanted.map((event) => `"${event}"`).join(' or ');
    const since = options.since ?? 0;
    return new Promise<LogLine>((resolve, reject) => {
      const timer = setTimeout(
        () => waiter.fail(`no ${description} within ${options.timeoutMs ?? WAIT_LIMIT_MS} ms`),
        options.timeoutMs ?? WAIT_LIMIT_MS,
      );
      const waiter = {
        check: () => {
          const found = logs.slice(since).find((line) => wanted.includes(line.event));
          if (found === undefined) return;
          waiters.delete(waiter);
          clearTimeout(timer);
          resolve(found);
        },
        fail: (why: string) => {
          waiters.delete(waiter);
          clearTimeout(timer);
          reject(new Error(`waiting for ${description}: ${why}`));
        },
      };
      waiters.add(waiter);
      waiter.check();
      if (waiters.has(waiter) && status !== undefined) {
        waiter.fail(`the daemon exited (${describeExit(status)})`);
      }
    });
  };

  let stopping: Promise<ExitStatus> | undefined;
  return {
    pid: child.pid ?? -1,
    logs,
    exited,
    waitFor,
    signal: (name) => {
      if (status === undefined) child.kill(name);
    },
    stop: () =>
      (stopping ??= (async () => {
        if (status !== undefined) return status;
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), STOP_LIMIT_MS);
        const result = await exited;
        clearTimeout(timer);
        return result;
      })()),
  };
}

export function describeExit(status: ExitStatus): string {
  if (status.signal !== null) return `killed by ${status.signal}`;
  return status.code === null ? 'failed to start' : `exit code ${status.code}`;
}

function parseLogLine(line: string): LogLine | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    const value: unknown = JSON.parse(line);
    return typeof value === 'object' && value !== null && 'event' in value
      ? (value as LogLine)
      : undefined;
  } catch {
    return undefined;
  }
}
