// The library API: token-reaper inside an existing Node service (the story's NestJS auth
// service, say) instead of as a process of its own. It installs no signal handlers and reads
// no environment: the host passes the settings, under the same names as the CLI's
// environment variables (README, "Configuration"), validated the same way.
import { loadConfig, type Config } from './config.js';
import { createDaemon, type Health, type Readiness, type StopOptions } from './daemon.js';
import { createDatabasePool } from './db.js';
import { createReaperEvents, type ReaperEvents } from './events.js';
import { explainTargets, type Explanation } from './explain.js';
import { createHostLogger, createLogger, type HostLogger, type Logger } from './logger.js';
import { wantsColors } from './pretty.js';
import type { SweepOptions, SweepOutcome } from './sweep/sweeper.js';
import { VERSION } from './version.js';

export { ConfigurationError, SchemaError } from './errors.js';
export type {
  CatchUpEvent,
  PurgeBatchEvent,
  ReaperEventMap,
  ReaperEvents,
  SweepProgressEvent,
  SweepRetryEvent,
} from './events.js';
export type { Health, Readiness, StopOptions, UnreadyReason } from './daemon.js';
export type { ReadinessProblem } from './readiness.js';
export type { Explanation, SourceExplanation, TargetExplanation } from './explain.js';
export { createHostLogger } from './logger.js';
export type { HostLogger, Logger } from './logger.js';
export type { SweepOptions, SweepOutcome, TableSweepResult } from './sweep/sweeper.js';
export type { Config };
export { createMetrics, startMetricsServer } from './metrics.js';
export type { Metrics, MetricsOptions, MetricsServer, MetricsServerOptions } from './metrics.js';

export interface ReaperOptions {
  /**
   * Settings by environment variable name: DATABASE_URL (required), REFRESH_TOKENS_TABLE,
   * REFRESH_TOKEN_CLEANUP_CRON, NODE_ENV (`test`: no schedule)… Pass `process.env` to read
   * the environment like the CLI does.
   */
  settings: Readonly<Record<string, string | undefined>>;
  /**
   * Defaults to lines on stdout at LOG_LEVEL: JSON, or with LOG_FORMAT=pretty in `settings`
   * short lines for a terminal, coloured when stdout is one (NO_COLOR and FORCE_COLOR in
   * `settings` are obeyed). Unlike the CLI, an unset LOG_FORMAT means JSON even on a terminal.
   */
  logger?: Logger;
  /**
   * A host's logger (NestJS's `Logger`, say) to write short lines to at LOG_LEVEL, without
   * the time and level it prints itself; used when `logger` is not given.
   */
  hostLogger?: HostLogger;
  /**
   * A targets file's content, `{ "targets": [ … ] }` (docs/configuration.md), instead of a path
   * in TOKEN_REAPER_CONFIG: `import targets from './token-reaper.json'`, say.
   */
  targets?: unknown;
  /**
   * False when the host runs the sweep schedule itself (the NestJS module's SchedulerRegistry
   * job), calling `sweep({ trigger: 'schedule' })`: the reaper then starts no timer of its own.
   * `config.sweep.schedule` and `config.scheduleEnabled` still say when sweeps are due.
   */
  schedule?: boolean;
}

export interface ReaperSweepOptions extends SweepOptions {
  /** What the sweep's log lines and metrics say started it; `api` unless a host's schedule did. */
  trigger?: 'api' | 'schedule';
}

export interface Reaper {
  /** Typed events: `sweep`, `progress`, `purge`, `catchUp`, `listener`. */
  readonly events: ReaperEvents;
  readonly config: Config;
  /** True while the listener is connected and the last sweep, if any, did not fail. */
  readonly ready: boolean;
  /** The same, with the reasons when not ready: what /readyz answers. */
  readiness(): Readiness;
  /** False once the listener has been down past LISTENER_DOWN_UNHEALTHY_AFTER: what /healthz answers. */
  health(): Health;
  /** Checks the tables, starts the listener and the schedule. Idempotent. */
  start(): Promise<void>;
  /**
   * Graceful stop; closes the pool. Idempotent. Statements still running after `timeoutMs`
   * (default 7 s) are cancelled.
   */
  stop(options?: StopOptions): Promise<void>;
  /** One sweep now; joins one already running. Never throws: failures are outcomes. */
  sweep(options?: ReaperSweepOptions): Promise<SweepOutcome>;
  /** What `token-reaper explain --json` prints: each target's shape, rule and counts. */
  explain(): Promise<Explanation>;
}

/** Throws ConfigurationError (naming every bad setting) before touching the database. */
export async function createReaper(options: ReaperOptions): Promise<Reaper> {
  // Not `pretty` on a terminal by default: a host's own logs decide what its terminal shows.
  const config = loadConfig(options.settings, {
    terminal: false,
    ...(options.targets === undefined ? {} : { targets: options.targets }),
  });
  const logger =
    options.logger ??
    (options.hostLogger && createHostLogger(options.hostLogger, config.logLevel)) ??
    createLogger({
      level: config.logLevel,
      format: config.logFormat,
      colors: wantsColors(process.stdout.isTTY === true, options.settings),
    });
  const events = createReaperEvents(logger);
  const pool = await createDatabasePool(config, logger, {
    maximumPoolSize: config.sweep.concurrency + 2,
  });
  const daemon = createDaemon({
    config: options.schedule === false ? { ...config, scheduleEnabled: false } : config,
    logger,
    pool,
    version: VERSION,
    events,
  });
  return {
    events,
    config,
    get ready() {
      return daemon.readiness().ready;
    },
    readiness: () => daemon.readiness(),
    health: () => daemon.health(),
    start: () => daemon.start(),
    stop: (options) => daemon.stop(options),
    sweep: ({ trigger = 'api', ...sweepOptions } = {}) => daemon.sweep(trigger, sweepOptions),
    explain: () => explainTargets(pool, config),
  };
}
