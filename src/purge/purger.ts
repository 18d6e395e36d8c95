// Deletes revoked tokens as their revocations arrive (a NOTIFY, or a change decoded from the
// slot: sources/), for one target with the prompt purge. There is no timer and no fixed
// delay: the first revocation is deleted at once, and every revocation that arrives while a
// DELETE is in flight waits for it and forms the next batch. Under a trickle each token goes
// alone, within a millisecond or two; under a burst the batches grow by themselves, up to
// MAXIMUM_BATCH_IDS, so the database sees few statements.
//
// The table is the truth and a notification is only a hint (pg-boss's rule):
// - every DELETE re-checks the purgeable predicate, so a token restored in the meantime, or
//   named by a forged payload, stays;
// - rows another transaction holds locked are skipped, never waited on, and come back in a
//   catch-up after a backoff, so one lock stalls nothing else;
// - a catch-up deletes every revoked row already in the table, partition by partition,
//   through the partial index on revoked rows (sweep/marked-rows.ts). It runs on every
//   (re)connect, because NOTIFYs sent while the listener was away are lost; after a payload
//   that cannot be trusted; when the queue overflows; and after anything failed or was left.
//
// Memory stays bounded: the queue holds at most MAXIMUM_QUEUED_IDS ids. Past that, further
// ids are dropped and one catch-up requested, which deletes them all without naming them.
import { sql, type DatabasePool, type DatabaseTransactionConnection } from 'slonik';
import { z } from 'zod';
import { retryOnDeadlock } from '../db.js';
import type { Config } from '../config.js';
import { createReaperEvents, type ReaperEvents } from '../events.js';
import { serializeError, type Logger } from '../logger.js';
import { deleteAroundLockedRows, withinRowLockWait } from '../locked-rows.js';
import { deletion, purgeablePredicate } from '../predicates.js';
import { forgetRevocations, recordRevocations, recordUnseenRevocations } from '../revocations.js';
import {
  columnOf,
  describeTarget,
  idTypeOf,
  pinnedRule,
  qualifiedName,
  recordsRevocationTimes,
  type TableShape,
} from '../schema.js';
import { deleteMarkedRows } from '../sweep/marked-rows.js';
import {
  payloadTables,
  validateRevocation,
  type PayloadFields,
  type Revocation,
} from './payload.js';

export const MAXIMUM_BATCH_IDS = 1_000;
export const MAXIMUM_QUEUED_IDS = 20_000;
/** catchUpSoon's delay: a flood of bad payloads costs one catch-up a second. */
const UNTRUSTED_HINT_CATCH_UP_DELAY_MS = 1_000;
/**
 * A look again at revocations a batch did not find revoked. Logical decoding can deliver a
 * commit a moment before other sessions see it (the commit record is flushed, and sent, just
 * before the transaction leaves the proc array), so the DELETE's re-check may still read the
 * row as live. A NOTIFY never comes that early; for it, this finds a restored token again.
 */
const NOT_VISIBLE_RECHECK_MS = 100;
/** Retries of locked or failed work: 1 s doubling to 30 s, back to 1 s once all is done. */
const RETRY_DELAY_MS = { first: 1_000, maximum: 30_000 };

export type CatchUpReason =
  | 'connected'
  | 'bad_payload'
  | 'queue_full'
  | 'grace_due'
  | 'locked_rows'
  | 'purge_failed'
  | 'poll'
  | 'slot_created'
  | 'not_visible';

/** How long a poll reuses the table's description: partitions come and go, but not by the 100 ms. */
const POLL_DESCRIPTION_TTL_MS = 10_000;

export interface Purger {
  /** The names a payload for this table carries: the table's, and its partitions'. */
  readonly tables: ReadonlySet<string>;
  /** The table as last described. */
  readonly shape: TableShape;
  /**
   * Validates a parsed NOTIFY payload (or a decoded change, in the same form) and queues its
   * id. Returns why a payload is not a revocation of this table's (the router logs it, and a
   * catch-up follows), or null.
   */
  receive(payload: PayloadFields): string | null;
  /**
   * Resolves once every revocation received before the call is settled: deleted (or found
   * kept) by a committed DELETE, recorded, or handed to a catch-up (a batch that failed or
   * met locked rows, a full queue). `wal` acknowledges a position only after this: what a
   * crash could still lose is only what was handed to a catch-up, and every start of `wal`
   * runs one. Resolves false instead when the purger stops first: those revocations were not
   * handled.
   */
  settled(): Promise<boolean>;
  /** Deletes every revoked row now in the table; resolves with the count once it has. */
  catchUp(reason: CatchUpReason): Promise<number>;
  /**
   * A catch-up in a moment, joined by every request until it starts: for a hint that could
   * not be trusted, of which a flood must cost one catch-up, not one each.
   */
  catchUpSoon(reason: CatchUpReason): void;
  /** True from a failed batch or catch-up until the next one succeeds: /readyz reports it. */
  readonly failing: boolean;
  /** Stops taking work and waits for the statement in flight, which commits or rolls back whole. */
  stop(): Promise<void>;
}

const batchRow = z.object({ deleted: z.number(), latencyMs: z.number().nullable() });

// A data exception (SQLSTATE class 22) is about a value, so the batch is split until the
// value is alone; anything else (a lost connection, a timeout) would fail the halves too.
const isValueError = (error: unknown) => serializeError(error).code?.startsWith('22') === true;

export function createPurger({
  pool,
  shape: described,
  config,
  logger,
  events = createReaperEvents(),
}: {
  pool: DatabasePool;
  /** The table as described at start; each catch-up describes it again. */
  shape: TableShape;
  config: Pick<Config, 'naiveTimestampsTimezone'>;
  logger: Logger;
  events?: ReaperEvents;
}): Purger {
  const log = logger.child('purge');
  const listenerLog = logger.child('listener');
  const tableName = qualifiedName(described.relation);
  // The relation found at start, whatever a later search_path says.
  const rule = pinnedRule(described);
  /**
   * The table as last described. Partitions come and go (the sweep drops them, premaking and
   * `partition convert` add them), so a catch-up, which visits each one, describes it first.
   */
  let shape = described;

  /**
   * id → the time of its revocation, and the number of the receive() that queued it; a Map, so
   * a repeated id is handled once. Insertion order is the order of the numbers.
   */
  const queue = new Map<string, { revokedAt: string; received: number }>();
  /** Numbers every receive(), so settled() knows which revocations came before it. */
  let received = 0;
  /** The lowest receive() number in the batch being deleted, or null. */
  let inFlightFrom: number | null = null;
  const settledWaiters: { upTo: number; resolve: (settled: boolean) => void }[] = [];
  let queueFull = false;
  /** A catch-up asked for and not yet started, with whoever waits for it. */
  let catchUp: { reasons: Set<CatchUpReason>; waiters: ((deleted: number) => void)[] } | null =
    null;
  let working: Promise<void> | null = null;
  let stopped = false;
  /** Aborted by stop(): a catch-up ends after the batch in flight, not after the table. */
  const stopping = new AbortController();
  let delayedCatchUp: { timer: NodeJS.Timeout; reasons: Set<CatchUpReason> } | null = null;
  let describedAt = performance.now();
  let retryDelayMs = RETRY_DELAY_MS.first;
  let failing = false;
  const grace = shape.marker?.graceSeconds ?? 0;
  // With a grace, a NOTIFY deletes nothing: it makes the daemon record when the row was first
  // seen revoked (a boolean column has no time of its own), and a catch-up on a timer deletes
  // the rows whose grace has passed, through the same grace-aware predicate as every delete.
  const recording = recordsRevocationTimes(shape);
  const graceTimer =
    grace > 0
      ? setInterval(
          () => requestCatchUp('grace_due'),
          Math.min(60_000, Math.max(1_000, (grace * 1000) / 4)),
        )
      : null;
  graceTimer?.unref();

  /** Returns the rows it left because another transaction holds them locked. */
  const deleteBatch = async (batch: readonly Revocation[]) => {
    const started = performance.now();
    const { relation } = shape;
    const idColumn = columnOf(relation, shape.id!.column);
    const purgeable = purgeablePredicate(shape, relation);
    const idsOf = (ids: readonly string[]) =>
      sql.fragment`${sql.array([...ids], 'text')}::${idTypeOf(shape)}[]`;
    // The latency is measured on the database clock: from the trigger's clock_timestamp()
    // at the UPDATE to the end of this DELETE, for the oldest revocation actually deleted.
    const statement = (transaction: DatabaseTransactionConnection) =>
      transaction.one(sql.type(batchRow)`
        ${deletion(shape, relation, {
          using: sql.fragment`unnest(
            ${idsOf(batch.map((revocation) => revocation.id))},
            ${sql.array(
              batch.map((revocation) => revocation.revokedAt),
              'text',
            )}::timestamptz[]
          ) AS batch (token_reaper_id, token_reaper_revoked_at)`,
          where: sql.fragment`${idColumn} = batch.token_reaper_id AND ${purgeable}`,
          returning: sql.fragment`batch.token_reaper_revoked_at`,
        })}
        SELECT count(*)::int AS deleted,
               (extract(epoch FROM clock_timestamp() - min(token_reaper_revoked_at)) * 1000)::float8
                 AS "latencyMs"
        FROM token_reaper_deleted
      `);
    const result = await retryOnDeadlock(() =>
      pool.connect(async (connection) => {
        const deleted = await withinRowLockWait(connection, relation, statement);
        if (deleted !== null) return { ...deleted, skipped: 0 };
        // A row lock is in the way: the other ids go now, the locked ones are left.
        const around = await deleteAroundLockedRows(connection, {
          shape,
          relation,
          keys: batch.map((revocation) => revocation.id),
          where: (part) => sql.fragment`${idColumn} = ANY(${idsOf(part)}) AND ${purgeable}`,
        });
        return { deleted: around.rows, latencyMs: null, skipped: around.skipped };
      }),
    );
    const report = {
      table: tableName,
      ids: batch.length,
      deleted: result.deleted,
      durationMs: Math.round(performance.now() - started),
      latencyMs: result.latencyMs === null ? null : Math.round(result.latencyMs * 10) / 10,
    };
    log.info('purge.batch', `purged ${result.deleted} of ${batch.length} revoked tokens`, {
      ...report,
      skipped: result.skipped,
    });
    events.emit('purge', report);
    if (result.deleted + result.skipped < batch.length) {
      catchUpAfter('not_visible', NOT_VISIBLE_RECHECK_MS);
    }
    return result.skipped;
  };

  const recordBatch = async (batch: readonly Revocation[]) => {
    const started = performance.now();
    const recorded = await recordRevocations(
      pool,
      shape,
      batch.map((revocation) => revocation.id),
    );
    log.info('purge.recorded', `recorded ${recorded} revocation times; the grace starts there`, {
      table: tableName,
      ids: batch.length,
      recorded,
      graceSeconds: grace,
      durationMs: Math.round(performance.now() - started),
    });
    return 0;
  };

  /**
   * Purges a batch; one that fails on a value is split until the value is alone, so every
   * other revocation in it still goes now. Anything that fails or is left locked is handed
   * to a catch-up after a backoff.
   */
  const purgeBatch = async (batch: readonly Revocation[]): Promise<void> => {
    try {
      const skipped = await (recording ? recordBatch(batch) : deleteBatch(batch));
      failing = false;
      if (skipped > 0) retryLater('locked_rows');
    } catch (error) {
      if (batch.length > 1 && isValueError(error)) {
        const half = Math.ceil(batch.length / 2);
        await purgeBatch(batch.slice(0, half));
        await purgeBatch(batch.slice(half));
        return;
      }
      failing = true;
      log.warn('purge.failed', 'purge failed; a catch-up will retry', {
        table: tableName,
        ids: batch.length,
        error,
      });
      retryLater('purge_failed');
    }
  };

  const runCatchUp = async () => {
    const { reasons, waiters } = catchUp!;
    // Cleared before the work starts: a request that arrives during it gets a catch-up of
    // its own afterwards, which sees the rows this one might have missed.
    catchUp = null;
    queueFull = false;
    const started = performance.now();
    let deleted = 0;
    let skipped = 0;
    const fields = () => ({
      table: tableName,
      reason: [...reasons].join(','),
      deleted,
      skipped,
      durationMs: Math.round(performance.now() - started),
    });
    const emit = (failed: boolean) =>
      events.emit('catchUp', {
        table: tableName,
        deleted,
        reasons: [...reasons],
        durationMs: Math.round(performance.now() - started),
        failed,
      });
    const pollOnly = reasons.size === 1 && reasons.has('poll');
    try {
      // A poll every 100 ms reuses a recent description; every other catch-up, and a poll
      // after a failure (a dropped partition, say), describes the table first.
      if (!pollOnly || failing || performance.now() - describedAt > POLL_DESCRIPTION_TTL_MS) {
        shape = (await describeTarget(pool, rule, config)) ?? shape;
        describedAt = performance.now();
      }
      // An un-revoke whose NOTIFY was lost must not leave a stale time behind.
      if (recording) await forgetRevocations(pool, shape);
      for (const leaf of shape.leaves) {
        if (stopped) break;
        if (recording) await recordUnseenRevocations(pool, shape, leaf);
        const result = await deleteMarkedRows(pool, shape, leaf, {
          signal: stopping.signal,
          onBatch: (rows) => (deleted += rows),
        });
        skipped += result.skipped;
      }
      if (!pollOnly) {
        listenerLog.info(
          'listener.caught_up',
          `caught up: ${deleted} revoked tokens deleted`,
          fields(),
        );
      } else if (deleted > 0 || skipped > 0) {
        log.info('purge.polled', `purged ${deleted} revoked tokens`, fields());
      }
      emit(false);
      failing = false;
      // Rows another transaction held locked come back after a backoff.
      if (skipped > 0) retryLater('locked_rows');
      else retryDelayMs = RETRY_DELAY_MS.first;
    } catch (error) {
      listenerLog.warn(
        'listener.catch_up_failed',
        `catch-up failed after deleting ${deleted} revoked tokens; retrying later`,
        { ...fields(), error },
      );
      emit(true);
      failing = true;
      retryLater('purge_failed');
    }
    for (const resolve of waiters) resolve(deleted);
    releaseSettled();
  };

  /** Resolves the settled() calls whose revocations have all been through a batch. */
  const releaseSettled = () => {
    const firstQueued = queue.values().next().value?.received ?? Infinity;
    const pendingFrom = Math.min(firstQueued, inFlightFrom ?? Infinity);
    for (let index = settledWaiters.length - 1; index >= 0; index -= 1) {
      const waiter = settledWaiters[index]!;
      if (waiter.upTo < pendingFrom || stopped) {
        settledWaiters.splice(index, 1);
        waiter.resolve(!stopped);
      }
    }
  };

  // One loop at a time: it drains the queue batch by batch, then runs a requested catch-up.
  const work = async () => {
    while (!stopped && (queue.size > 0 || catchUp !== null)) {
      if (queue.size > 0) {
        const batch: Revocation[] = [];
        for (const [id, { revokedAt, received: number }] of queue) {
          inFlightFrom ??= number;
          batch.push({ id, revokedAt });
          queue.delete(id);
          if (batch.length === MAXIMUM_BATCH_IDS) break;
        }
        await purgeBatch(batch);
        inFlightFrom = null;
        releaseSettled();
      } else {
        await runCatchUp();
      }
    }
  };

  const start = () => {
    if (working || stopped) return;
    working = work().finally(() => {
      working = null;
      // Work asked for between the loop's last look and now (from a continuation that ran
      // before this one, such as a settled() waiter asking for a catch-up) starts a new loop.
      if (queue.size > 0 || catchUp !== null) start();
    });
  };

  const requestCatchUp = (reason: CatchUpReason) => {
    if (stopped) return null;
    catchUp ??= { reasons: new Set(), waiters: [] };
    catchUp.reasons.add(reason);
    // Kept before start(), which may take the request at once and clear `catchUp`.
    const requested = catchUp;
    start();
    return requested;
  };

  /** A catch-up after `delayMs`; requests made meanwhile join it. */
  const catchUpAfter = (reason: CatchUpReason, delayMs: number) => {
    if (stopped) return;
    if (delayedCatchUp) {
      delayedCatchUp.reasons.add(reason);
      return;
    }
    const reasons = new Set([reason]);
    const timer = setTimeout(() => {
      delayedCatchUp = null;
      for (const each of reasons) requestCatchUp(each);
    }, delayMs);
    timer.unref();
    delayedCatchUp = { timer, reasons };
  };

  /** Locked or failed work comes back after a backoff that grows while it keeps coming back. */
  const retryLater = (reason: CatchUpReason) => {
    catchUpAfter(reason, retryDelayMs);
    retryDelayMs = Math.min(retryDelayMs * 2, RETRY_DELAY_MS.maximum);
  };

  return {
    tables: payloadTables(shape),
    get shape() {
      return shape;
    },
    get failing() {
      return failing;
    },
    receive(payload) {
      if (stopped) return null;
      const parsed = validateRevocation(payload, shape);
      if ('problem' in parsed) return parsed.problem;
      received += 1;
      // A catch-up that has not started yet handles this row too.
      if (queueFull) return null;
      if (queue.size >= MAXIMUM_QUEUED_IDS && !queue.has(parsed.id)) {
        queueFull = true;
        log.warn('purge.queue_full', 'too many revocations queued; a catch-up deletes them', {
          table: tableName,
          queued: queue.size,
        });
        // Every queued id is a committed revocation, and the catch-up deletes every revoked
        // row, so the queue has nothing left to add: deleting it one by one would only
        // produce batches that find nothing.
        queue.clear();
        requestCatchUp('queue_full');
        return null;
      }
      // A timestamp column keeps its own revocation time: with a grace, nothing to do now.
      if (grace > 0 && !recording) return null;
      if (!queue.has(parsed.id)) {
        queue.set(parsed.id, { revokedAt: parsed.revokedAt, received });
      }
      start();
      return null;
    },
    settled() {
      return new Promise<boolean>((resolve) => {
        settledWaiters.push({ upTo: received, resolve });
        releaseSettled();
      });
    },
    catchUp(reason) {
      const requested = requestCatchUp(reason);
      if (requested === null) return Promise.resolve(0);
      return new Promise<number>((resolve) => requested.waiters.push(resolve));
    },
    catchUpSoon: (reason) => catchUpAfter(reason, UNTRUSTED_HINT_CATCH_UP_DELAY_MS),
    async stop() {
      stopped = true;
      stopping.abort();
      if (graceTimer) clearInterval(graceTimer);
      if (delayedCatchUp) clearTimeout(delayedCatchUp.timer);
      delayedCatchUp = null;
      queue.clear();
      await working;
      // Whoever waits for a catch-up that will not run now is told that nothing was deleted.
      if (catchUp) for (const resolve of catchUp.waiters) resolve(0);
      catchUp = null;
      // Nothing more will be deleted here: whoever waits is told so, and acknowledges nothing
      // (wal then decodes those revocations again at the next start).
      releaseSettled();
    },
  };
}
