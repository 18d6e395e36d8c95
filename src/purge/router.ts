// One LISTEN channel serves every target with the trigger: the payload names its table, and
// goes to that table's purger. A payload that is not a revocation is logged here, the one
// place, and answered with a catch-up: by its table's purger when it names one, else by
// every purger, since nothing in it can be trusted.
//
// Anyone who can connect can NOTIFY, so the log must not be a lever either: problems are
// counted by kind, and each kind is logged at most twice an interval, its first occurrence
// at once and then how many more there were. Never the payload itself, whose id may be a
// token hash: its length and the problem only.
import type { Logger } from '../logger.js';
import { parsePayload } from './payload.js';
import type { Purger } from './purger.js';

export const BAD_PAYLOAD_LOG_INTERVAL_MS = 10_000;

export interface NotificationRouter {
  route(payload: string | undefined): void;
  /** Logs what is still counted, and stops the interval. */
  stop(): void;
}

export function createNotificationRouter(
  purgers: readonly Purger[],
  logger: Logger,
  intervalMs = BAD_PAYLOAD_LOG_INTERVAL_MS,
): NotificationRouter {
  const log = logger.child('listener');
  /** Per problem: the payloads seen since its line was written in this interval. */
  const unlogged = new Map<string, { count: number; lastLength: number }>();
  const loggedThisInterval = new Set<string>();

  const flush = () => {
    for (const [problem, { count, lastLength }] of unlogged) {
      log.warn('listener.bad_payload', `ignored ${count} more notifications: ${problem}`, {
        problem,
        count,
        length: lastLength,
        intervalMs,
      });
    }
    unlogged.clear();
    loggedThisInterval.clear();
  };
  const timer = setInterval(flush, intervalMs);
  timer.unref();

  const report = (problem: string, length: number) => {
    if (!loggedThisInterval.has(problem)) {
      loggedThisInterval.add(problem);
      log.warn('listener.bad_payload', `ignored a notification: ${problem}`, {
        problem,
        count: 1,
        length,
      });
      return;
    }
    const counted = unlogged.get(problem) ?? { count: 0, lastLength: 0 };
    counted.count += 1;
    counted.lastLength = length;
    unlogged.set(problem, counted);
  };

  return {
    route(payload) {
      const parsed = parsePayload(payload);
      const table = 'fields' in parsed ? parsed.fields.table : undefined;
      const purger = purgers.find((candidate) => candidate.tables.has(String(table)));
      const problem =
        'problem' in parsed
          ? parsed.problem
          : purger === undefined
            ? 'payload names another table, or none'
            : purger.receive(parsed.fields);
      if (problem === null) return;
      report(problem, payload?.length ?? 0);
      for (const each of purger ? [purger] : purgers) each.catchUpSoon('bad_payload');
    },
    stop() {
      clearInterval(timer);
      flush();
    },
  };
}
