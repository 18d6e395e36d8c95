// The default strategy for a plain table: walk the heap once, from page 0 (or where an
// unfinished walk stopped, positions.ts) to the size it had when the sweep started, in ranges
// sized to take about SWEEP_BATCH_TARGET_MS each (pacing.ts). Each range is one statement,
//
//   DELETE FROM t WHERE ctid >= '(from,0)' AND ctid < '(to,0)' AND <dead predicate>
//
// which PostgreSQL 14+ runs as a TID Range Scan: it reads exactly those pages and nothing
// else. Unlike `DELETE … WHERE id IN (SELECT … LIMIT n)`, no batch rescans the dead tuples
// that earlier batches left behind, so the whole walk costs about what one big DELETE costs
// (DESIGN.md measured 0.9–1.0×), while each batch is its own short transaction: locks are
// held for milliseconds, vacuum is never held back for long, and WAL comes in small pieces.
//
// A dead row that an auth transaction holds locked (FOR KEY SHARE, the lock a foreign-key
// check takes, or FOR UPDATE) would make that statement wait until the lock goes or the
// statement timeout fails the sweep. So each batch is a transaction of its own that takes the
// table lock as usual and then waits at most ROW_LOCK_WAIT_MS for any row lock. Only when
// that expires does it delete around the locked rows (deleteAroundLockedRows) and report
// them as skipped, for the sweeper to retry.
//
// The obvious way around a row lock, `ctid = ANY(ARRAY(SELECT ctid … FOR UPDATE SKIP
// LOCKED))` in every batch, was measured and rejected, for two reasons:
// - FOR UPDATE needs the UPDATE privilege on the table, which the role `install --role`
//   makes does not have, on purpose: UPDATE would let it un-revoke or extend a token;
// - row locks are written to the heap and the WAL. On PostgreSQL 15 (2 cores, shared with
//   other work), 1,000,000 rows with 509,615 dead, 500-page batches, medians of 9
//   alternating runs on fresh copies: the plain statement 1,420 ms and 141 MB of WAL; with
//   SKIP LOCKED 1,680 ms (0.85× the throughput) and 170 MB (+20%); the plain statement in a
//   transaction with LOCK TABLE and SET LOCAL lock_timeout 1,184 ms and 141 MB, no cost. An
//   earlier set of 9 runs (the transaction without LOCK TABLE) gave SKIP LOCKED 0.92× the
//   throughput and +18% WAL, and the transaction again no cost.
//
// The same walk counts instead of deleting for a dry run, so `--dry-run` reads the table
// exactly as gently as the real sweep would. A count takes no row lock and never waits on one.
import { sql, type DatabasePool, type FragmentSqlToken } from 'slonik';
import { z } from 'zod';
import { retryOnDeadlock } from '../db.js';
import { countDeleted, deleteAroundLockedRows, withinRowLockWait } from '../locked-rows.js';
import { deadPredicate } from '../predicates.js';
import { regclassOf, relationIdentifier, type Relation, type TableShape } from '../schema.js';
import type { Pacer } from './pacing.js';
import { CHECKPOINT_INTERVAL_MS, type SweepPositions } from './positions.js';
import type { ReplicaGate } from './replica-lag.js';

export type BatchMode = 'delete' | 'count';

export interface BatchReport {
  relation: Relation;
  fromPage: number;
  toPage: number;
  /** Rows deleted, or in count mode rows that would be. */
  rows: number;
  /**
   * Dead rows left because other transactions held them locked (with, past the narrowing
   * budget, neighbours not yet told apart from them); 0 in count mode.
   */
  skipped: number;
  durationMs: number;
}

export interface TidRangeWalk {
  pool: DatabasePool;
  /** The target, whose dead rule every batch re-checks. */
  shape: TableShape;
  /** The relation walked: the table, or one of its partitions. */
  relation: Relation;
  /** Sizes each batch and pauses after it (pacing.ts). */
  pacer: Pacer;
  /** Waited for before each batch: the standbys and logical consumers (replica-lag.ts). */
  gate: ReplicaGate | null;
  /**
   * Where an earlier, unfinished walk of this round stopped, and where this one saves how far
   * it got (positions.ts); null to walk from page 0 and save nothing.
   */
  positions: SweepPositions | null;
  /** Workers that claim ranges from one shared cursor, each on its own connection. */
  concurrency: number;
  mode: BatchMode;
  /** Checked between batches: a batch in flight always finishes whole. */
  signal: AbortSignal;
  /** Called after every batch; a batch with `skipped` rows names the range to retry. */
  onBatch: (batch: BatchReport) => void;
  /** Called once the walk knows how many pages it will cover. */
  onStart?: (pages: number) => void;
}

export interface TidRangeResult {
  rows: number;
  batches: number;
  /** The page the walk started from: 0, or where an unfinished walk stopped. */
  fromPage: number;
  pages: number;
  /** False when the signal ended it before the last page. */
  complete: boolean;
}

export interface TidRange {
  shape: TableShape;
  relation: Relation;
  fromPage: number;
  toPage: number;
}

const sizeRow = z.object({ pages: z.number(), filenode: z.number() });
const countRow = z.object({ count: z.number() });
const ctidRow = z.object({ ctid: z.string() });

function rangePredicate({ shape, relation, fromPage, toPage }: TidRange): FragmentSqlToken {
  return sql.fragment`ctid >= ${`(${fromPage},0)`}::tid AND ctid < ${`(${toPage},0)`}::tid AND ${deadPredicate(shape, relation)}`;
}

/**
 * Deletes the dead rows of one page range, leaving those another transaction holds locked,
 * and counts them as `skipped`. Safe to run again on the same range: it deletes only what is
 * still dead.
 */
export function deleteTidRange(
  pool: DatabasePool,
  range: TidRange,
): Promise<{ rows: number; skipped: number }> {
  return retryOnDeadlock(() => deleteTidRangeOnce(pool, range));
}

function deleteTidRangeOnce(pool: DatabasePool, range: TidRange) {
  return pool.connect(async (connection) => {
    const { shape, relation } = range;
    const rows = await withinRowLockWait(connection, relation, (transaction) =>
      countDeleted(transaction, shape, relation, rangePredicate(range)),
    );
    if (rows !== null) return { rows, skipped: 0 };
    // A row lock is in the way: the range's dead rows, listed without a lock, in physical order.
    const dead = await connection.anyFirst(sql.type(ctidRow)`
      SELECT ctid::text AS ctid FROM ${relationIdentifier(relation)}
      WHERE ${rangePredicate(range)} ORDER BY ctid
    `);
    const around = await deleteAroundLockedRows(connection, {
      shape,
      relation,
      keys: dead,
      where: (part) =>
        sql.fragment`ctid = ANY(${sql.array([...part], 'tid')}) AND ${deadPredicate(shape, relation)}`,
    });
    return { rows: around.rows, skipped: around.skipped };
  });
}

export async function walkTidRanges(walk: TidRangeWalk): Promise<TidRangeResult> {
  const { pool, shape, relation, pacer, gate, positions, signal } = walk;
  const { pages, filenode } = await pool.one(sql.type(sizeRow)`
    SELECT (pg_relation_size(${regclassOf(relation)})
            / current_setting('block_size')::int)::int AS pages,
           coalesce(pg_relation_filenode(${regclassOf(relation)}), 0)::int8::float8 AS filenode
  `);
  const fromPage = Math.min(positions?.startOf(relation, filenode)?.nextPage ?? 0, pages);
  walk.onStart?.(pages - fromPage);

  const runBatch = async (range: TidRange) => {
    if (walk.mode === 'delete') return deleteTidRange(pool, range);
    const rows = await pool.oneFirst(
      sql.type(countRow)`SELECT count(*)::int AS count FROM ${relationIdentifier(relation)}
                         WHERE ${rangePredicate(range)}`,
    );
    return { rows, skipped: 0 };
  };

  // With several workers, ranges finish out of order: the position saved is the end of the
  // unbroken run of finished ranges from the start, so a resumed walk skips nothing unwalked.
  const claimed: { toPage: number; done: boolean }[] = [];
  let walkedTo = fromPage;
  const advance = () => {
    while (claimed[0]?.done) walkedTo = claimed.shift()!.toPage;
  };
  let savedAt = performance.now();
  const checkpoint = async () => {
    if (positions === null) return;
    savedAt = performance.now();
    await positions.save(relation, { nextPage: walkedTo, filenode });
  };

  let nextPage = fromPage;
  let rows = 0;
  let batches = 0;
  let failed = false;
  const worker = async () => {
    while (!signal.aborted && !failed && nextPage < pages) {
      await gate?.wait(signal);
      if (signal.aborted || failed || nextPage >= pages) break;
      // Claiming a range is synchronous, so workers never overlap without any locking.
      const range = {
        shape,
        relation,
        fromPage: nextPage,
        toPage: Math.min(nextPage + pacer.nextPages(), pages),
      };
      nextPage = range.toPage;
      const claim = { toPage: range.toPage, done: false };
      claimed.push(claim);
      const started = performance.now();
      try {
        const batch = await runBatch(range);
        const durationMs = performance.now() - started;
        rows += batch.rows;
        batches += 1;
        claim.done = true;
        advance();
        walk.onBatch({ ...range, ...batch, durationMs: Math.round(durationMs) });
        if (performance.now() - savedAt > CHECKPOINT_INTERVAL_MS) await checkpoint();
        await pacer.finished(range.toPage - range.fromPage, durationMs, signal);
      } catch (error) {
        failed = true;
        throw error;
      }
    }
  };
  // allSettled, so that when one worker fails the others finish their batch in flight
  // before the failure is reported, and no statement outlives the sweep.
  const outcomes = await Promise.allSettled(
    Array.from({ length: Math.max(1, walk.concurrency) }, worker),
  );
  const failure = outcomes.find((outcome) => outcome.status === 'rejected');
  if (failure) throw failure.reason;
  if (walkedTo > fromPage || walkedTo === pages) await checkpoint();
  return { rows, batches, fromPage, pages, complete: walkedTo >= pages };
}
