// The sweep's pacing on a real PostgreSQL: batches sized by their measured duration, and a
// window (SWEEP_MAX_DURATION) after which the sweep ends, the next resuming where it stopped.
import { expect } from 'chai';
import { loadConfig } from '../src/config.js';
import { describeTarget } from '../src/schema.js';
import { createPacer } from '../src/sweep/pacing.js';
import { deleteMarkedRows, MARKED_ROWS_BATCH } from '../src/sweep/marked-rows.js';
import type { SweepOutcome } from '../src/sweep/sweeper.js';
import type { CapturedLine } from './support/capture-logger.js';
import { useTestDatabase } from './support/database.js';
import { allIds, createPartitionedTable, liveIds } from './support/fixtures.js';
import {
  installSweepPositions,
  referenceTokenTable,
  slowDeletes,
  sweeperFor,
} from './support/sweeper.js';
import { finishedSweep } from './support/targets.js';

interface BatchLine {
  fromPage: number;
  toPage: number;
}

const batchesOf = (lines: readonly CapturedLine[]) =>
  lines.map((line) => line as unknown as BatchLine);
const sizes = (batches: readonly BatchLine[]) =>
  batches.map((batch) => batch.toPage - batch.fromPage);

/**
 * A sweep that a SWEEP_MAX_DURATION of a few hundred ms ends in the middle of a table: batches
 * of one page, not sized by time (on a fast server they would grow, and the walk finish within
 * the window), each followed by a pause four times as long.
 */
const SLOW_WALK = { SWEEP_BATCH_PAGES: '1', SWEEP_BATCH_TARGET_MS: '0', SWEEP_PAUSE_RATIO: '4' };

describe('the sweep’s pacing', () => {
  const database = useTestDatabase('sweep_pacing');
  const cleanup: (() => Promise<void>)[] = [];
  afterEach(async () => {
    while (cleanup.length > 0) await cleanup.pop()!();
  });

  const tokenTable = (schema: string, count: number) =>
    referenceTokenTable(database.current, schema, count, 0.42);

  const environment = (table: string, settings: Record<string, string> = {}) => ({
    REFRESH_TOKENS_TABLE: table,
    PASSWORD_RESETS_TABLE: 'none',
    SWEEP_PAUSE_RATIO: '0',
    ...settings,
  });

  it('grows the batches on a table whose pages are quick to sweep', async () => {
    const table = await tokenTable('pacing_fast', 30_000);
    const { sweeper, logs } = await sweeperFor(
      database.current,
      environment(table, { SWEEP_BATCH_PAGES: '1', SWEEP_BATCH_TARGET_MS: '50' }),
      cleanup,
    );
    const outcome = finishedSweep(await sweeper.sweep('cli'));
    const batches = sizes(batchesOf(logs.events('sweep.batch')));
    expect(batches[0]).to.equal(1);
    expect(Math.max(...batches)).to.be.at.least(8);
    // Growth is at most twofold from one batch to the next.
    for (const [index, pages] of batches.slice(1).entries()) {
      expect(pages).to.be.at.most(2 * batches[index]!);
    }
    const durations = outcome.tables[table]!.batchDurationMs!;
    expect(durations.p50).to.be.at.most(durations.p99);
    expect(durations.p99).to.be.at.most(durations.max);
    expect(outcome.batchDurationMs).to.deep.equal(durations);
  });

  it('shrinks the batches on a table whose batches are slow, and deletes the same rows', async () => {
    const table = await tokenTable('pacing_slow', 3_000);
    // A trigger that makes every deleted row cost 1 ms: a 16-page batch takes hundreds.
    await slowDeletes(database.current, table, 0.001, 'ROW');
    const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
    const { sweeper, logs } = await sweeperFor(
      database.current,
      environment(table, { SWEEP_BATCH_PAGES: '16', SWEEP_BATCH_TARGET_MS: '20' }),
      cleanup,
    );
    const outcome = finishedSweep(await sweeper.sweep('cli'));
    const batches = sizes(batchesOf(logs.events('sweep.batch')));
    expect(batches[0]).to.equal(16);
    expect(batches[1]).to.be.below(16);
    // Settled at one page, but for a probe of two now and then (see the pacer's own tests).
    const settled = batches.slice(4, -1);
    expect(settled.filter((pages) => pages === 1).length).to.be.above(0.8 * settled.length);
    expect(outcome.tables[table]!.batchDurationMs!.max).to.be.above(100);
    expect(await allIds(database.current, { table })).to.deep.equal(live);
  });

  it('does not shrink the batches for a cost every batch has whatever its size', async () => {
    const table = await tokenTable('pacing_fixed', 20_000);
    // Every DELETE statement takes 30 ms, as long as the target and well over the batches'
    // aim (12 ms), however few its pages: smaller batches would be no faster, only more.
    await slowDeletes(database.current, table, 0.03, 'STATEMENT');
    const { sweeper, logs } = await sweeperFor(
      database.current,
      environment(table, { SWEEP_BATCH_PAGES: '4', SWEEP_BATCH_TARGET_MS: '30' }),
      cleanup,
    );
    finishedSweep(await sweeper.sweep('cli'));
    const batches = sizes(batchesOf(logs.events('sweep.batch')));
    // The first batches shrink, until sizes differ enough to tell the fixed cost apart; then
    // they grow past the first one, and keep growing (e.g. 4, 2, 1, 2, 3, 6, 12, 24, 46, 82).
    expect(batches.at(-2)).to.be.above(8);
    expect(Math.max(...batches)).to.be.above(16);
  });

  it('keeps every batch at SWEEP_BATCH_PAGES with SWEEP_BATCH_TARGET_MS=0', async () => {
    const table = await tokenTable('pacing_fixed_size', 20_000);
    const { sweeper, logs } = await sweeperFor(
      database.current,
      environment(table, { SWEEP_BATCH_PAGES: '7', SWEEP_BATCH_TARGET_MS: '0' }),
      cleanup,
    );
    finishedSweep(await sweeper.sweep('cli'));
    const batches = sizes(batchesOf(logs.events('sweep.batch')));
    expect(new Set(batches.slice(0, -1))).to.deep.equal(new Set([7]));
  });

  it('pauses after each batch for SWEEP_PAUSE_RATIO times its duration', async () => {
    const table = await tokenTable('pacing_pause', 3_000);
    await slowDeletes(database.current, table, 0.03, 'STATEMENT');
    const { sweeper, logs } = await sweeperFor(
      database.current,
      environment(table, {
        SWEEP_BATCH_PAGES: '4',
        SWEEP_BATCH_TARGET_MS: '1000',
        SWEEP_PAUSE_RATIO: '3',
      }),
      cleanup,
    );
    const outcome = finishedSweep(await sweeper.sweep('cli'));
    const busyMs = logs
      .events('sweep.batch')
      .reduce((sum, line) => sum + (line.durationMs as number), 0);
    // Each batch is followed by a pause of 3× its duration: the sweep lasts about 4× its
    // batches (the last pause included), and surely more than 3×.
    expect(outcome.durationMs).to.be.at.least(3 * busyMs);
  });

  it('paces batches of marked rows as well: the replica gate before each, the pause after each but the last', async () => {
    // What a sweep of a table partitioned by expiry runs on its older partitions.
    const table = await tokenTable('pacing_marked', 2 * MARKED_ROWS_BATCH + 2_000);
    await database.current.query(`UPDATE ${table} SET revoked = true`);
    const settings = environment(table);
    const { pool } = await sweeperFor(database.current, settings, cleanup);
    const config = loadConfig({ DATABASE_URL: database.current.url, ...settings });
    const shape = (await describeTarget(pool, config.targets[0]!, config))!;
    const calls: string[] = [];
    const result = await deleteMarkedRows(pool, shape, shape.relation, {
      pacing: {
        beforeBatch: async () => {
          calls.push('gate');
        },
        afterBatch: async (durationMs) => {
          expect(durationMs).to.be.above(0);
          calls.push('pause');
        },
      },
    });
    expect(result).to.deep.equal({ rows: 2 * MARKED_ROWS_BATCH + 2_000, batches: 3, skipped: 0 });
    expect(calls).to.deep.equal(['gate', 'pause', 'gate', 'pause', 'gate']);
  });

  describe('SWEEP_MAX_DURATION', () => {
    it('ends a sweep as partial; the next resumes from its position, rereads nothing, and together they delete exactly the dead rows', async () => {
      await installSweepPositions(database.current);
      const table = await tokenTable('pacing_window', 60_000);
      const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
      const first = await sweeperFor(
        database.current,
        environment(table, {
          ...SLOW_WALK,
          SWEEP_MAX_DURATION: '400ms',
        }),
        cleanup,
      );
      const partial = finishedSweep(await first.sweeper.sweep('schedule'));
      expect(partial).to.include({ partial: true, interrupted: false });
      expect(partial.tables[table]).to.include({ complete: false });
      const finishedLine = first.logs.events('sweep.finished')[0]!;
      expect(finishedLine).to.include({ partial: true });
      expect(finishedLine.message).to.match(/SWEEP_MAX_DURATION.*resumes/);
      const walked = batchesOf(first.logs.events('sweep.batch'));
      const stoppedAt = Math.max(...walked.map((batch) => batch.toPage));
      const pages = Number(
        (
          await database.current.query(
            `SELECT pg_relation_size('${table}') / current_setting('block_size')::int AS pages`,
          )
        )[0]!.pages,
      );
      expect(stoppedAt).to.be.above(0).and.below(pages);
      const saved = await database.current.query(
        'SELECT target, relation, next_page FROM token_reaper.sweep_positions',
      );
      expect(saved).to.deep.equal([{ target: table, relation: table, next_page: stoppedAt }]);

      const second = await sweeperFor(
        database.current,
        environment(table, { SWEEP_BATCH_PAGES: '64' }),
        cleanup,
      );
      const rest = finishedSweep(await second.sweeper.sweep('schedule'));
      expect(rest).to.include({ partial: false });
      expect(rest.tables[table]).to.include({ complete: true, resumedFromPage: stoppedAt });
      const resumed = batchesOf(second.logs.events('sweep.batch'));
      expect(resumed[0]!.fromPage).to.equal(stoppedAt);
      expect(Math.min(...resumed.map((batch) => batch.fromPage))).to.equal(stoppedAt);
      expect(Math.max(...resumed.map((batch) => batch.toPage))).to.equal(pages);
      expect(await allIds(database.current, { table })).to.deep.equal(live);
      expect(partial.deleted + rest.deleted).to.equal(60_000 - live.size);
      // The round is complete: the next sweep starts from page 0 again.
      expect(
        await database.current.query('SELECT * FROM token_reaper.sweep_positions'),
      ).to.deep.equal([]);
      const third = await sweeperFor(database.current, environment(table), cleanup);
      finishedSweep(await third.sweeper.sweep('schedule'));
      expect(batchesOf(third.logs.events('sweep.batch'))[0]!.fromPage).to.equal(0);
    });

    it('resumes a table partitioned by expiry in its default partition, where the partial sweep stopped', async () => {
      await installSweepPositions(database.current);
      await createPartitionedTable(database.current, 'pacing_parts', {
        fromDay: -2,
        toDay: 3,
        withDefault: true,
      });
      const table = 'pacing_parts.refresh_tokens';
      const partition = 'pacing_parts.refresh_tokens_default';
      // A first sweep makes the partitions ahead, so that the partial one below spends its
      // window walking rather than making them.
      finishedSweep(
        await (
          await sweeperFor(database.current, environment(table), cleanup)
        ).sweeper.sweep('cli'),
      );
      // Rows that no day partition takes: long expired, or expiring beyond any horizon.
      await database.current.query(
        `INSERT INTO ${table} (user_id, token_hash, revoked, expires_at)
         SELECT gen_random_uuid(), md5(random()::text || i), random() < 0.2,
                now() + CASE WHEN random() < 0.5 THEN -1 ELSE 1 END * (interval '500 days' + random() * interval '10 days')
         FROM generate_series(1, 40000) i`,
      );
      const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
      const first = await sweeperFor(
        database.current,
        environment(table, {
          ...SLOW_WALK,
          SWEEP_MAX_DURATION: '400ms',
        }),
        cleanup,
      );
      const partial = finishedSweep(await first.sweeper.sweep('schedule'));
      expect(partial).to.include({ partial: true });
      const inPartition = (lines: readonly CapturedLine[]) =>
        batchesOf(lines.filter((line) => line.table === partition));
      const walked = inPartition(first.logs.events('sweep.batch'));
      const stoppedAt = Math.max(...walked.map((batch) => batch.toPage));
      expect(stoppedAt).to.be.above(0);
      const saved = await database.current.query(
        `SELECT relation, next_page FROM token_reaper.sweep_positions WHERE target = '${table}'`,
      );
      // The current day's partition, which the window left unwalked, may be saved at page 0.
      expect(saved.filter((row) => row.next_page !== 0)).to.deep.equal([
        { relation: partition, next_page: stoppedAt },
      ]);

      const second = await sweeperFor(database.current, environment(table), cleanup);
      const rest = finishedSweep(await second.sweeper.sweep('schedule'));
      expect(rest).to.include({ partial: false });
      const resumed = inPartition(second.logs.events('sweep.batch'));
      expect(resumed[0]!.fromPage).to.equal(stoppedAt);
      expect(Math.min(...resumed.map((batch) => batch.fromPage))).to.equal(stoppedAt);
      expect(await allIds(database.current, { table })).to.deep.equal(live);
      expect(
        await database.current.query('SELECT * FROM token_reaper.sweep_positions'),
      ).to.deep.equal([]);
    });

    it('starts a table rewritten since the partial sweep from page 0', async () => {
      await installSweepPositions(database.current);
      const table = await tokenTable('pacing_rewritten', 30_000);
      const first = await sweeperFor(
        database.current,
        environment(table, {
          ...SLOW_WALK,
          SWEEP_MAX_DURATION: '300ms',
        }),
        cleanup,
      );
      expect(finishedSweep(await first.sweeper.sweep('schedule'))).to.include({ partial: true });
      await database.current.query(`VACUUM FULL ${table}`);
      const second = await sweeperFor(database.current, environment(table), cleanup);
      const rest = finishedSweep(await second.sweeper.sweep('schedule'));
      expect(rest.tables[table]).to.not.have.property('resumedFromPage');
      expect(batchesOf(second.logs.events('sweep.batch'))[0]!.fromPage).to.equal(0);
    });

    it('sweeps from page 0 with one warning where install has not made the positions table', async () => {
      await database.current.query('DROP SCHEMA IF EXISTS token_reaper CASCADE');
      const table = await tokenTable('pacing_no_positions', 20_000);
      const live = await liveIds(database.current, { table, kind: 'refresh_tokens' });
      const { sweeper, logs } = await sweeperFor(
        database.current,
        environment(table, {
          ...SLOW_WALK,
          SWEEP_MAX_DURATION: '300ms',
        }),
        cleanup,
      );
      const outcomes: SweepOutcome[] = [];
      outcomes.push(await sweeper.sweep('schedule'), await sweeper.sweep('schedule'));
      for (const outcome of outcomes) expect(finishedSweep(outcome)).to.include({ partial: true });
      const warnings = logs.events('sweep.positions_unavailable');
      expect(warnings).to.have.length(1);
      expect(warnings[0]!.level).to.equal('warn');
      expect(warnings[0]!.message).to.match(/does not exist \(run `token-reaper install`\)/);
      const starts = logs
        .events('sweep.batch')
        .map((line) => line.fromPage)
        .filter((page) => page === 0);
      expect(starts).to.have.length(2);
      // Partial sweeps still delete only dead rows.
      const remaining = await allIds(database.current, { table });
      expect([...live].filter((id) => !remaining.has(id))).to.deep.equal([]);
    });
  });
});

// The pacer alone, fed batch durations from a cost model: what it does over a whole walk,
// exactly, with none of a real server's noise.
describe('the pacer, on modelled batches', () => {
  const notAborted = new AbortController().signal;

  /** The page counts of `batches` batches whose durations `costMs(pages, index)` gives. */
  async function walk(
    costMs: (pages: number, index: number) => number,
    batches: number,
    settings: { startPages: number; targetMs: number },
  ) {
    const pacer = createPacer({ ...settings, pauseRatio: 0 });
    const sizes: number[] = [];
    for (let index = 0; index < batches; index++) {
      const pages = pacer.nextPages();
      sizes.push(pages);
      await pacer.finished(pages, costMs(pages, index), notAborted);
    }
    return sizes;
  }

  it('grows again after one noisy first batch made a fixed cost look like dear pages', async () => {
    // Every batch costs 30 ms whatever its size, but the first took 60: fitted on it, the
    // pages look dear and the batches shrink to one page, where sizes no longer differ.
    const sizes = await walk((pages, index) => (index === 0 ? 60 : 30) + 0.01 * pages, 40, {
      startPages: 4,
      targetMs: 30,
    });
    expect(sizes.slice(1, 6)).to.deep.equal([1, 1, 1, 1, 1]);
    expect(sizes.at(-1)).to.be.above(100);
  });

  it('probes two pages only once in a while on a table whose every page is slow', async () => {
    // 40 ms a page, twice the target: one page is the best there is.
    const sizes = await walk((pages) => 40 * pages, 100, { startPages: 16, targetMs: 20 });
    const probes = sizes.slice(1).filter((pages) => pages !== 1);
    expect(probes).to.deep.equal(Array(probes.length).fill(2));
    expect(probes.length).to.be.within(1, Math.ceil(100 / 17));
  });
});
