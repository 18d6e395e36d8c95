// A sweeper on a test database, configured from environment variables as the daemon would
// be, with a capturing logger and an event emitter to watch it by.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { DatabasePool } from 'slonik';
import { loadConfig } from '../../src/config.js';
import { createDatabasePool } from '../../src/db.js';
import { createReaperEvents, type ReaperEvents } from '../../src/events.js';
import { createSweeper, type Sweeper, type SweeperDependencies } from '../../src/sweep/sweeper.js';
import { createCapturingLogger, type CapturingLogger } from './capture-logger.js';
import { repositoryRoot } from './cli.js';
import { createReferenceSchema, insertRandomRows, type DatabaseTarget } from './fixtures.js';

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
  dependencies: Pick<SweeperDependencies, 'maxReplicaPauseMs'> = {},
): Promise<SweeperHarness> {
  const config = loadConfig({ DATABASE_URL: database.url, NODE_ENV: 'test', ...environment });
  const logs = createCapturingLogger('debug');
  const events = createReaperEvents();
  const pool = await createDatabasePool(config, logs.logger, {
    maximumPoolSize: config.sweep.concurrency + 1,
  });
  const sweeper = createSweeper({ pool, config, logger: logs.logger, events, ...dependencies });
  cleanup.push(async () => {
    await sweeper.stop();
    await pool.end();
  });
  return { sweeper, pool, logs, events };
}

/** What install makes for sweep positions: the token_reaper schema and its sweep_positions. */
export async function installSweepPositions(database: {
  query: (text: string) => Promise<unknown>;
}): Promise<void> {
  for (const file of ['001-schema.sql', '008-sweep-positions.sql']) {
    await database.query(await readFile(join(repositoryRoot, 'sql', file), 'utf8'));
  }
}

/** A reference refresh-tokens table alone in `schema`, filled with `count` random rows. */
export async function referenceTokenTable(
  database: DatabaseTarget,
  schema: string,
  count: number,
  seed: number = Math.random(),
): Promise<string> {
  await createReferenceSchema(database, { schema, passwordResetsTable: null });
  const table = `${schema}.refresh_tokens`;
  await insertRandomRows(database, { table, kind: 'refresh_tokens', count, seed });
  return table;
}

/**
 * Makes every DELETE on `table` (a `schema.table`) slower by `seconds`: for each deleted row
 * (a cost per page), or once per statement (a cost every batch has whatever its size).
 */
export async function slowDeletes(
  database: { query: (text: string) => Promise<unknown> },
  table: string,
  seconds: number,
  each: 'ROW' | 'STATEMENT',
): Promise<void> {
  const schema = table.split('.')[0]!;
  await database.query(`
    CREATE FUNCTION ${schema}.slow() RETURNS trigger LANGUAGE plpgsql
    AS $$ BEGIN PERFORM pg_sleep(${seconds}); RETURN NULL; END $$;
    CREATE TRIGGER slow AFTER DELETE ON ${table}
      FOR EACH ${each} EXECUTE FUNCTION ${schema}.slow();
  `);
}
