// PURGE_SOURCE=notify: the revoke trigger NOTIFYs at commit, and one LISTEN connection routes
// each payload to its table's purger. NOTIFYs sent while the listener is away are lost, so
// every connect is followed by a catch-up.
import type { Config } from '../../config.js';
import type { ReaperEvents } from '../../events.js';
import { createListener } from '../../listener.js';
import type { Logger } from '../../logger.js';
import type { Purger } from '../purger.js';
import { createNotificationRouter } from '../router.js';
import type { PurgeSource } from './source.js';

export function createNotifySource({
  config,
  logger,
  purgers,
  events,
}: {
  config: Pick<Config, 'databaseUrl' | 'listenDatabaseUrl' | 'notifyChannel'>;
  logger: Logger;
  purgers: readonly Purger[];
  events: ReaperEvents;
}): PurgeSource {
  const router = createNotificationRouter(purgers, logger);
  const listener = createListener({
    config,
    logger,
    onNotification: (payload) => router.route(payload),
    onConnected: () => {
      for (const purger of purgers) void purger.catchUp('connected');
    },
    events,
  });
  return {
    name: 'notify',
    start: () => listener.start(),
    async stop() {
      router.stop();
      await listener.stop();
    },
    get connected() {
      return listener.connected;
    },
    get standby() {
      return listener.standby;
    },
    downForMs: () => listener.downForMs(),
  };
}
