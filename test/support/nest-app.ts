// Drives test/fixtures/nestjs/app/app.cjs, a Nest app with token-reaper's module, as a child
// process: it says when it listens and forwards the reaper's sweeps as events; the test asks
// it for its status, a sweep, an explanation or a clean close over IPC, and sends HTTP
// requests to its routes like any client.
import { join } from 'node:path';
import { spawnProcess, waitFor, type ExitStatus, type ProcessHandle } from './cli.js';

export interface NestAppOptions {
  /** What the app's ConfigService holds, handed to TokenReaperModule.forRootAsync. */
  readonly settings: Readonly<Record<string, string | number>>;
  /** Whether the app imports ScheduleModule.forRoot(). */
  readonly schedule: boolean;
  readonly failFast?: boolean;
}

export interface AppEvent {
  readonly event: string;
  readonly [field: string]: unknown;
}

export interface NestApp {
  readonly process: ProcessHandle;
  /** What the app sent of its own accord: `listening`, `bootstrap_failed`, `sweep`, `purge`. */
  readonly events: readonly AppEvent[];
  /** The HTTP port, once the app listens; rejects when it exits or fails to boot first. */
  readonly listening: Promise<number>;
  ask<T extends object>(op: string): Promise<T>;
  get(path: string): Promise<{ status: number; body: unknown }>;
  waitForEvent(matches: (event: AppEvent) => boolean, message: string): Promise<AppEvent>;
  /** Waits until the reaper has left `starting`, and returns its status. */
  settled(): Promise<ReaperStatus>;
  /** app.close() over IPC; resolves with the exit status. */
  close(): Promise<ExitStatus>;
}

export interface ReaperStatus {
  state: string;
  up: boolean;
  ready: boolean;
  problem: string | null;
  reasons: string[];
  retryAt: string | null;
}

export function launchNestApp(project: string, options: NestAppOptions): NestApp {
  const handle = spawnProcess(
    process.execPath,
    [
      join(project, 'app.cjs'),
      JSON.stringify({
        settings: options.settings,
        schedule: options.schedule,
        failFast: options.failFast ?? false,
      }),
    ],
    { NODE_ENV: undefined },
    { cwd: project, ipc: true, label: 'nest app' },
  );
  const events: AppEvent[] = [];
  const answers = new Map<number, (answer: Record<string, unknown>) => void>();
  let lastId = 0;
  handle.child.on('message', (message: Record<string, unknown>) => {
    if (typeof message.id === 'number') answers.get(message.id)?.(message);
    else events.push(message as AppEvent);
  });
  const exitedFirst = handle.exited.then((status) => {
    throw new Error(`the nest app exited (${JSON.stringify(status)})\n${handle.describeOutput()}`);
  });
  exitedFirst.catch(() => undefined);

  const waitForEvent = (matches: (event: AppEvent) => boolean, message: string) =>
    Promise.race([
      waitFor(() => events.find(matches), { message, timeoutMs: 30_000 }),
      exitedFirst,
    ]);
  const listening = waitForEvent(
    (event) => event.event === 'listening' || event.event === 'bootstrap_failed',
    'the app to listen',
  ).then((event) => {
    if (event.event !== 'listening') throw new Error(`bootstrap failed: ${String(event.message)}`);
    return event.port as number;
  });
  listening.catch(() => undefined);

  const ask = async <T extends object>(op: string): Promise<T> => {
    const id = ++lastId;
    const answered = new Promise<Record<string, unknown>>((resolve) => answers.set(id, resolve));
    handle.child.send({ id, op });
    const answer = await Promise.race([answered, exitedFirst]);
    answers.delete(id);
    if (answer.error) throw Object.assign(new Error(JSON.stringify(answer.error)), answer.error);
    return answer as T;
  };

  return {
    process: handle,
    events,
    listening,
    ask,
    async get(path) {
      const response = await fetch(`http://127.0.0.1:${await listening}${path}`);
      return { status: response.status, body: await response.json() };
    },
    waitForEvent,
    async settled() {
      return waitFor(
        async () => {
          const { status } = await ask<{ status: ReaperStatus }>('status');
          return status.state !== 'starting' && status;
        },
        { message: 'the reaper to leave "starting"', timeoutMs: 30_000 },
      );
    },
    async close() {
      await ask('close');
      return handle.exited;
    },
  };
}
