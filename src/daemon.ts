// Wires the parts together. start() and stop() are idempotent: a second call gets the
// promise of the first.
import { setTimeout as delay } from 'node:timers/promises';
import type { DatabasePool } from 'slonik';
import type { Config } from './config.js';
import { cancelStatements } from './db.js';
import { createReaperEvents, type ReaperEvents } from './events.js';
import type { Logger } from './logger.js';
import { checkReadiness, type ReadinessProblem, type UnreadyReason } from './readiness.js';
import { createPurger, type Purger } from './purge/purger.js';
import { createNotifySource } from './purge/sources/notify.js';
import { createPollSource } from './purge/sources/poll.js';
import type { PurgeSource } from './purge/sources/source.js';
import { createWalSource } from './purge/sources/wal.js';
import { startSchedule, type Schedule } from './scheduler.js';
import {
  describeTargetsToRun,
  expiryTimeColumn,
  markerColumn,
  pinnedRule,
  qualifiedName,
} from './schema.js';
import type { TargetRule } from './targets/rule.js';
import { describeReading } from './targets/time.js';
import {
  createSweeper,
  type SweepOptions,
  type SweepOutcome,
  type SweepTrigger,
} from './sweep/sweeper.js';

export type { UnreadyReason } from './readiness.js';

export interface Readiness {
  ready: boolean;
  /** Empty when ready. */
  reasons: UnreadyReason[];
  /** What the periodic check found, with a message each (readiness.ts); empty when none. */
  problems: ReadinessProblem[];
}

export interface Health {
  healthy: boolean;
  /** `listener_down`: down longer than LISTENER_DOWN_UNHEALTHY_AFTER. Empty when healthy. */
  reasons: 'listener_down'[];
}

export interface Daemon {
  /** Typed events: every sweep outcome, progress, purge batches, catch-ups, the listener. */
  readonly events: ReaperEvents;
  /**
   * True while revocations reach the purge: the listener has LISTEN in place (notify), the
   * slot streams or stands by for another daemon's (wal), or polls run (poll).
   */
  readonly listening: boolean;
  /**
   * Ready while the listener is connected and the last sweep did not fail (a skipped sweep
   * is normal with two replicas; any sweep that gets through its tables clears a failure).
   * /readyz and the library's `ready` both answer with this.
   */
  readiness(): Readiness;
  /**
   * Unhealthy once the listener has been down longer than LISTENER_DOWN_UNHEALTHY_AFTER: a
   * supervisor then restarts a daemon that cannot get its LISTEN back. /healthz answers with it.
   */
  health(): Health;
  start(): Promise<void>;
  stop(options?: StopOptions): Promise<void>;
  sweep(trigger: SweepTrigger, options?: SweepOptions): Promise<SweepOutcome>;
  /** Settles once the retry of the rows the last sweep left locked is over (Sweeper.retrySettled). */
  retrySettled(): Promise<void>;
}

export interface StopOptions {
  /**
   * How long the work in flight may take to finish; statements still running then are
   * cancelled. Default 7 s, so that the CLI exits within 10 s of SIGTERM.
   */
  timeoutMs?: number;
}

export const DEFAULT_STOP_TIMEOUT_MS = 7_000;

export interface DaemonDependencies {
  config: Config;
  logger: Logger;
  /** The daemon owns the pool from here on: stop() ends it. */
  pool: DatabasePool;
  version: string;
  events?: ReaperEvents;
}

export function createDaemon({
  config,
  logger,
  pool,
  version,
  events = createReaperEvents(logger),
}: DaemonDependencies): Daemon {
  const log = logger.child('daemon');
  /** The targets as resolved at start; until then, as configured. */
  let pinnedRules: readonly TargetRule[] | null = null;
  const sweeper = createSweeper({
    pool,
    config,
    logger,
    events,
    targets: () => pinnedRules ?? config.targets,
  });
  let lastSweepFailed = false;
  events.on('sweep', (outcome) => {
    if (outcome.status !== 'skipped') lastSweepFailed = outcome.status === 'failed';
  });
  let schedule: Schedule | null = null;
  let source: PurgeSource | null = null;
  let purgers: Purger[] = [];
  let starting: Promise<void> | null = null;
  let stopping: Promise<void> | null = null;
  let problems: ReadinessProblem[] = [];
  let readinessTimer: NodeJS.Timeout | null = null;

  /** Checks what the daemon needs to delete, and logs when that changes. */
  const checkNeeds = async () => {
    const found = await checkReadiness(pool, pinnedRules ?? config.targets, config);
    const key = (list: readonly ReadinessProblem[]) =>
      JSON.stringify(list.map((problem) => [problem.reason, problem.table]));
    if (key(found) !== key(problems)) {
      if (found.length > 0) {
        log.warn('daemon.unready', found.map((problem) => problem.message).join(' '), {
          reasons: [...new Set(found.map((problem) => problem.reason))],
          problems: found,
        });
      } else {
        log.info('daemon.ready', 'the trigger, the rights and the database are as needed again');
      }
    }
    problems = found;
  };

  const start = async () => {
    // Fail fast on a wrong table or column: exit 2 now beats a failed sweep at 3 am.
    const shapes = await describeTargetsToRun(pool, config);
    // Optional targets that are missing stay missing for this run, as they were at start.
    pinnedRules = shapes.map(pinnedRule);
    for (const shape of shapes) {
      for (const warning of shape.warnings) {
        log.warn('daemon.target_warning', warning, { table: qualifiedName(shape.relation) });
      }
    }
    const prompt = shapes.filter((shape) => shape.notify);
    const sourceName = config.purge.source;
    for (const shape of prompt) {
      const table = qualifiedName(shape.relation);
      if (sourceName === 'notify' && !shape.revokeTriggerInstalled) {
        log.warn(
          'listener.trigger_missing',
          `${table} has no revoke trigger, so revoked tokens wait for the sweep. Run "token-reaper install" to add it.`,
          { table },
        );
      } else if (sourceName !== 'notify' && shape.revokeTriggerInstalled) {
        log.warn(
          'daemon.target_warning',
          `${table} still has the revoke trigger, which PURGE_SOURCE=${sourceName} does not use and which costs every revoking commit. Run "token-reaper install" with PURGE_SOURCE=${sourceName} to drop it.`,
          { table },
        );
      }
    }
    await checkNeeds();
    readinessTimer = setInterval(
      () => void checkNeeds(),
      config.health.readinessCheckIntervalSeconds * 1000,
    );
    readinessTimer.unref();
    purgers = prompt.map((shape) => createPurger({ pool, shape, config, logger, events }));
    const sources = { notify: createNotifySource, wal: createWalSource, poll: createPollSource };
    source = sources[sourceName]({ config, logger, purgers, events });
    await source.start();
    if (config.scheduleEnabled) {
      schedule = startSchedule({
        expression: config.sweep.schedule,
        timezone: config.sweep.timezone,
        logger,
        onTick: () => sweeper.sweep('schedule'),
      });
    }
    log.info('daemon.started', `token-reaper ${version} started`, {
      version,
      channel: config.notifyChannel,
      source: sourceName,
      schedule: schedule ? config.sweep.schedule : null,
      timezone: config.sweep.timezone,
      nextSweepAt: schedule?.nextRun()?.toISOString() ?? null,
      targets: shapes.map((shape) => ({
        table: qualifiedName(shape.relation),
        target: shape.rule.label,
        marker: shape.marker ? markerColumn(shape.marker) : null,
        expiry: shape.expiry === null ? null : describeReading(expiryTimeColumn(shape.expiry)),
        notify: shape.notify,
        partitioned: shape.partitioned,
      })),
    });
  };

  // Everything is told to stop at once, then awaited: the listener UNLISTENs, the purgers
  // and a running sweep end after the statement in flight (which commits or rolls back
  // whole), and the schedule stops firing. Only then is the pool closed.
  // A statement still running at the deadline (one waiting behind another session's lock of
  // the whole table, say) is cancelled, not awaited: the stop then ends within the deadline
  // and a little more, whatever the database does.
  const stop = async ({ timeoutMs = DEFAULT_STOP_TIMEOUT_MS }: StopOptions = {}) => {
    await starting?.catch(() => undefined);
    if (readinessTimer) clearInterval(readinessTimer);
    const everything = Promise.all([
      source?.stop(),
      ...purgers.map((purger) => purger.stop()),
      schedule?.stop(),
      sweeper.stop(),
    ]);
    const deadline = new AbortController();
    const cancelling = delay(timeoutMs, undefined, { signal: deadline.signal }).then(
      async () => {
        const cancelled = await cancelStatements(pool);
        log.warn(
          'daemon.stop_deadline',
          `still stopping after ${timeoutMs} ms; cancelled the statements in flight`,
          { timeoutMs, connections: cancelled },
        );
      },
      () => undefined,
    );
    await everything;
    deadline.abort();
    await cancelling;
    // Ending a pool whose connections died with the server can fail; the process is
    // stopping either way, and the failure is not worth a non-zero exit.
    await pool.end().catch((error: unknown) => {
      log.warn('daemon.pool_end_failed', 'closing the database pool failed', { error });
    });
    log.info('daemon.stopped', 'token-reaper stopped');
  };

  return {
    events,
    get listening() {
      return source?.connected ?? false;
    },
    readiness() {
      const reasons = new Set<UnreadyReason>();
      if (!(source?.connected ?? false)) reasons.add('listener_disconnected');
      if (source?.standby) reasons.add('database_standby');
      if (lastSweepFailed) reasons.add('last_sweep_failed');
      if (purgers.some((purger) => purger.failing)) reasons.add('purge_failing');
      for (const problem of problems) reasons.add(problem.reason);
      return { ready: reasons.size === 0, reasons: [...reasons], problems };
    },
    health() {
      const downMs = source?.downForMs() ?? 0;
      return downMs > config.health.listenerDownUnhealthyAfterSeconds * 1000
        ? { healthy: false, reasons: ['listener_down'] }
        : { healthy: true, reasons: [] };
    },
    start: () => (starting ??= start()),
    stop: (options) => (stopping ??= stop(options)),
    sweep: (trigger, options) => sweeper.sweep(trigger, options),
    retrySettled: () => sweeper.retrySettled(),
  };
}
