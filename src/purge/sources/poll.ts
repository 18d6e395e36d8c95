// PURGE_SOURCE=poll: no trigger, no slot, no session. Every interval each purger runs its
// catch-up, which deletes the revoked rows through the partial index on them, so a poll that
// finds nothing reads a few index pages. It needs nothing but DELETE: it works through a
// transaction-mode pooler and on any managed PostgreSQL, at the price of up to one interval
// of latency.
//
// The interval runs from the start of one poll to the start of the next, and a poll that
// takes longer than the interval is followed at once, never overlapped.
import type { Config } from '../../config.js';
import type { Logger } from '../../logger.js';
import type { Purger } from '../purger.js';
import type { PurgeSource } from './source.js';

export function createPollSource({
  config,
  logger,
  purgers,
}: {
  config: Pick<Config, 'purge'>;
  logger: Logger;
  purgers: readonly Purger[];
}): PurgeSource {
  const intervalMs = config.purge.pollIntervalMs;
  let timer: NodeJS.Timeout | null = null;
  let polling: Promise<void> | null = null;
  let stopped = false;

  const poll = async (reason: 'connected' | 'poll') => {
    const started = performance.now();
    // A purger's catch-up never rejects: a failure is logged and retried by the purger.
    await Promise.all(purgers.map((purger) => purger.catchUp(reason)));
    if (stopped) return;
    const wait = Math.max(0, intervalMs - (performance.now() - started));
    timer = setTimeout(() => {
      polling = poll('poll');
    }, wait);
  };

  return {
    name: 'poll',
    start() {
      logger
        .child('purge')
        .info('purge.polling', `polling for revoked tokens every ${intervalMs} ms`, {
          intervalMs,
        });
      // The first catch-up deletes what was revoked while no daemon ran, as a connect does.
      polling = poll('connected');
      return Promise.resolve();
    },
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      await polling;
    },
    // The pool connects for each poll; a failed poll makes its purger report purge_failing.
    get connected() {
      return !stopped;
    },
    standby: false,
    downForMs: () => 0,
  };
}
