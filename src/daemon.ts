// Wires the parts together. start() and stop() are idempotent: a second call gets the
// promise of the first. Shutdown runs in a fixed order: the listener UNLISTENs, so nothing
// new arrives; the purge's DELETE in flight finishes; the schedule stops firing; a running
// sweep stops between batches (its batch in flight commits or rolls back whole); and only
// then is the pool closed.
import type { DatabasePool } from 'slonik';
import type { Config } from './config.js';
import { createReaperEvents, type ReaperEvents } from './events.js';
import type { Logger } from './logger.js';
import { createListener, type Listener } from './listener.js';
import { createPurger, type Purger } from './purge/purger.js';
import { createNotificationRouter, type NotificationRouter } from './purge/router.js';
import { startSchedule, type Schedule } from './scheduler.js';
import { describeTargetsToRun, expiryTimeColumn, markerColumn, qualifiedName } from './schema.js';
import { describeReading } from './targets/time.js';
import {
  createSweeper,
  type SweepOptions,
  type SweepOutcome,
  type SweepTrigger,
} from './sweep/sweeper.js';

export type UnreadyReason = 'listener_disconnected' | 'last_sweep_failed';

export interface Readiness {
  ready: boolean;
  /** Empty when ready. */
  reasons: UnreadyReason[];
}

export interface Daemon {
  /** Typed events: every sweep outcome, progress, purge batches, catch-ups, the listener. */
  readonly events: ReaperEvents;
  /** True while the listener is connected with LISTEN in place. */
  readonly listening: boolean;
  /**
   * Ready while the listener is connected and the last sweep did not fail (a skipped sweep
   * is normal with two replicas; any sweep that gets through its tables clears a failure).
   * /readyz and the library's `ready` both answer with this.
   */
  readiness(): Readiness;
  start(): Promise<void>;
  stop(): Promise<void>;
  sweep(trigger: SweepTrigger, options?: SweepOptions): Promise<SweepOutcome>;
  /** Settles once the retry of the rows the last sweep left locked is over (Sweeper.retrySettled). */
  retrySettled(): Promise<void>;
}

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
  events = createReaperEvents(),
}: DaemonDependencies): Daemon {
  const log = logger.child('daemon');
  const sweeper = createSweeper({ pool, config, logger, events });
  let lastSweepFailed = false;
  events.on('sweep', (outcome) => {
    if (outcome.status !== 'skipped') lastSweepFailed = outcome.status === 'failed';
  });
  let schedule: Schedule | null = null;
  let listener: Listener | null = null;
  let purgers: Purger[] = [];
  let router: NotificationRouter | null = null;
  let starting: Promise<void> | null = null;
  let stopping: Promise<void> | null = null;

  const start = async () => {
    // Fail fast on a wrong table or column: exit 2 now beats a failed sweep at 3 am.
    const shapes = await describeTargetsToRun(pool, config);
    const prompt = shapes.filter((shape) => shape.notify);
    for (const shape of prompt.filter((each) => !each.revokeTriggerInstalled)) {
      log.warn(
        'listener.trigger_missing',
        `${qualifiedName(shape.relation)} has no revoke trigger, so revoked tokens wait for the sweep. Run "token-reaper install" to add it.`,
        { table: qualifiedName(shape.relation) },
      );
    }
    purgers = prompt.map((shape) => createPurger({ pool, shape, logger, events }));
    const notifications = createNotificationRouter(purgers, logger);
    router = notifications;
    listener = createListener({
      config,
      logger,
      onNotification: (payload) => notifications.route(payload),
      onConnected: () => {
        for (const purger of purgers) void purger.catchUp('connected');
      },
      events,
    });
    await listener.start();
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

  const stop = async () => {
    await starting?.catch(() => undefined);
    await listener?.stop();
    router?.stop();
    await Promise.all(purgers.map((purger) => purger.stop()));
    await schedule?.stop();
    await sweeper.stop();
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
      return listener?.connected ?? false;
    },
    readiness() {
      const reasons: UnreadyReason[] = [];
      if (!(listener?.connected ?? false)) reasons.push('listener_disconnected');
      if (lastSweepFailed) reasons.push('last_sweep_failed');
      return { ready: reasons.length === 0, reasons };
    },
    start: () => (starting ??= start()),
    stop: () => (stopping ??= stop()),
    sweep: (trigger, options) => sweeper.sweep(trigger, options),
    retrySettled: () => sweeper.retrySettled(),
  };
}
