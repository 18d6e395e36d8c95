// A sweeper on a test database, configured from environment variables as the daemon would
// be, with a capturing logger and an event emitter to watch it by.
import type { DatabasePool } from 'slonik';
import { loadConfig } from '../../src/config.js';
import { createDatabasePool } from '../../src/db.js';
import { createReaperEvents, type ReaperEvents } from '../../src/events.js';
import { createSweeper, type Sweeper } from '../../src/sweep/sweeper.js';
import { createCapturingLogger, type CapturingLogger } from './capture-logger.js';

export interface SweeperHarness {
  sweeper: Sweeper;
  pool: DatabasePool;
  logs: CapturingLogger;
  events: ReaperEvents;
}

/** Made on `url`; what `cleanup` runs stops the sweeper and closes its pool. */
export async function sweeperFor(
  database: { url: string },
  environment: Record<string, string>,
  cleanup: (() => Promise<void>)[],
): Promise<SweeperHarness> {
  const config = loadConfig({ DATABASE_URL: database.url, NODE_ENV: 'test', ...environment });
  const logs = createCapturingLogger('debug');
  const events = createReaperEvents();
  const pool = await createDatabasePool(config, logs.logger, {
    maximumPoolSize: config.sweep.concurrency + 1,
  });
  const sweeper = createSweeper({ pool, config, logger: logs.logger, events });
  cleanup.push(async () => {
    await sweeper.stop();
    await pool.end();
  });
  return { sweeper, pool, logs, events };
}
