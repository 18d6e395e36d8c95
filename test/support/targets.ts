// In-process token-reaper parts for a targets file: the file is written to a temporary
// directory, loaded through loadConfig like the CLI loads it, and the parts get a pool of their
// own. Everything made here is undone by the returned `close`.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DatabasePool } from 'slonik';
import { loadConfig, type Config } from '../../src/config.js';
import { createDatabasePool } from '../../src/db.js';
import { createReaperEvents, type ReaperEvents } from '../../src/events.js';
import { describeTargets, type TableShape } from '../../src/schema.js';
import { createSweeper, type Sweeper, type SweepOutcome } from '../../src/sweep/sweeper.js';
import { createCapturingLogger, type CapturingLogger } from './capture-logger.js';

/** Writes `content` as a targets file; returns its path and a function that removes it. */
export async function writeTargetsFile(content: unknown) {
  const directory = await mkdtemp(join(tmpdir(), 'token-reaper-targets-'));
  const path = join(directory, 'targets.json');
  await writeFile(path, typeof content === 'string' ? content : JSON.stringify(content));
  return { path, remove: () => rm(directory, { recursive: true, force: true }) };
}

export interface TargetsHarness {
  config: Config;
  pool: DatabasePool;
  sweeper: Sweeper;
  events: ReaperEvents;
  logs: CapturingLogger;
  shapes(): Promise<TableShape[]>;
  close(): Promise<void>;
}

export async function targetsHarness(
  url: string,
  targets: unknown,
  environment: Record<string, string> = {},
): Promise<TargetsHarness> {
  const file = await writeTargetsFile({ targets });
  const config = loadConfig(
    { DATABASE_URL: url, NODE_ENV: 'test', ...environment },
    { configPath: file.path },
  );
  const logs = createCapturingLogger('debug');
  const events = createReaperEvents();
  const pool = await createDatabasePool(config, logs.logger, { maximumPoolSize: 3 });
  const sweeper = createSweeper({ pool, config, logger: logs.logger, events });
  return {
    config,
    pool,
    sweeper,
    events,
    logs,
    shapes: () => describeTargets(pool, config),
    async close() {
      await sweeper.stop();
      await pool.end();
      await file.remove();
    },
  };
}

/** The finished outcome, or an error that shows what happened instead. */
export function finishedSweep(outcome: SweepOutcome) {
  if (outcome.status !== 'finished') {
    throw new Error(`expected a finished sweep, got ${JSON.stringify(outcome)}`);
  }
  return outcome;
}
