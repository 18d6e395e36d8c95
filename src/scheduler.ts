// The daily sweep on node-cron. The tick only asks the sweeper for a sweep; the sweeper's
// own guard is what prevents overlap, so a scheduled run, SIGUSR1 and the CLI all obey the
// same rule. node-cron's `noOverlap` stays on as a second line.
import cron from 'node-cron';
import type { Logger } from './logger.js';

export interface Schedule {
  /** The next run, as node-cron computes it in the schedule's timezone. */
  nextRun(): Date | null;
  stop(): Promise<void>;
}

export interface ScheduleOptions {
  expression: string;
  timezone: string | null;
  logger: Logger;
  /** Must not throw; the sweeper's `sweep()` never does. */
  onTick: () => Promise<unknown>;
}

export function startSchedule({ expression, timezone, logger, onTick }: ScheduleOptions): Schedule {
  const log = logger.child('scheduler');
  const task = cron.schedule(expression, () => onTick(), {
    name: 'token-reaper-sweep',
    noOverlap: true,
    ...(timezone === null ? {} : { timezone }),
    // node-cron reports missed runs (a blocked event loop, a suspended host) through its
    // logger; route those into ours so they are JSON lines like everything else.
    logger: {
      info: (message) => log.debug('scheduler.notice', String(message)),
      debug: (message) => log.debug('scheduler.notice', String(message)),
      warn: (message) => log.warn('scheduler.warning', String(message)),
      error: (message) => log.warn('scheduler.warning', String(message)),
    },
  });
  return {
    nextRun: () => task.getNextRun(),
    stop: async () => {
      await task.destroy();
    },
  };
}
