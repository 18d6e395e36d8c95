// What the scenes share: the options, the things earlier scenes started, and the cleanups that
// stop them again, run last-in first-out whether the demo succeeds, fails or is interrupted.
import type pg from 'pg';

import type { EmbeddedServer } from '../test/support/embedded-server.js';
import type { DaemonProcess } from './daemon-process.js';

export interface DemoOptions {
  /** Leave the server and the daemon running after the sweep, until Ctrl-C or SIGTERM. */
  readonly keep: boolean;
}

/** A demo table as it stood before the sweep. */
export interface TableBefore {
  readonly total: number;
  readonly liveIds: ReadonlySet<string>;
  readonly dead: number;
}

export class Demo {
  readonly before = new Map<string, TableBefore>();
  #server?: EmbeddedServer;
  #pool?: pg.Pool;
  #daemon?: DaemonProcess;
  readonly #cleanups: { what: string; run: () => Promise<unknown> }[] = [];
  readonly #stopRequested: Promise<NodeJS.Signals>;
  #requestStop!: (signal: NodeJS.Signals) => void;

  constructor(readonly options: DemoOptions) {
    this.#stopRequested = new Promise((resolve) => (this.#requestStop = resolve));
  }

  /** Settles with the first SIGINT, SIGTERM or SIGHUP the demo receives. */
  get stopRequested(): Promise<NodeJS.Signals> {
    return this.#stopRequested;
  }
  requestStop(signal: NodeJS.Signals): void {
    this.#requestStop(signal);
  }

  // Each is set by the scene that starts it; asking earlier is a bug in the order of scenes.
  get server(): EmbeddedServer {
    return required(this.#server, 'the server');
  }
  set server(server: EmbeddedServer) {
    this.#server = server;
  }
  get pool(): pg.Pool {
    return required(this.#pool, 'the pool');
  }
  set pool(pool: pg.Pool) {
    this.#pool = pool;
  }
  get daemon(): DaemonProcess {
    return required(this.#daemon, 'the daemon');
  }
  set daemon(daemon: DaemonProcess) {
    this.#daemon = daemon;
  }

  /** The daemon's environment: the embedded server, and info-level logs. */
  get daemonEnvironment(): Record<string, string> {
    return { DATABASE_URL: this.server.url, NODE_ENV: 'test', LOG_LEVEL: 'info' };
  }

  onCleanup(what: string, run: () => Promise<unknown>): void {
    this.#cleanups.push({ what, run });
  }

  /** Runs the cleanups not run yet, newest first; returns what failed. Safe to call twice. */
  async cleanUp(): Promise<string[]> {
    const failures: string[] = [];
    for (let cleanup = this.#cleanups.pop(); cleanup; cleanup = this.#cleanups.pop()) {
      try {
        await cleanup.run();
      } catch (error) {
        failures.push(`${cleanup.what}: ${error instanceof Error ? error.message : String(error)}`);
      }
    }
    return failures;
  }
}

function required<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new Error(`${what} is not started yet; check the order of scenes`);
  return value;
}
