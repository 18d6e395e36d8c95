// Deletes revoked tokens as their NOTIFYs arrive, for every target with the revoke trigger. There is no timer and no fixed
// delay: the first revocation is deleted at once, and every revocation that arrives while a
// DELETE is in flight waits for it and forms the next batch. Under a trickle each token goes
// alone, within a millisecond or two; under a burst the batches grow by themselves, up to
// MAXIMUM_BATCH_IDS, so the database sees few statements.
//
// The table is the truth and a notification is only a hint (pg-boss's rule):
// - every DELETE re-checks the revoked predicate, so a token restored in the meantime stays;
// - a catch-up deletes every revoked row already in the table, partition by partition,
//   through the partial index on revoked rows (sweep/marked-rows.ts). It runs on every (re)connect, because NOTIFYs sent while the listener was
//   away are lost; after a payload that cannot be trusted; and when the queue overflows;
// - a purge that fails is left to the next catch-up and the daily sweep.
//
// Memory stays bounded: the queue holds at most MAXIMUM_QUEUED_IDS ids. Past that, further
// ids are dropped and one catch-up requested, which deletes them all without naming them.
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import { retryOnDeadlock } from './db.js';
import { createReaperEvents, type ReaperEvents } from './events.js';
import type { Logger } from './logger.js';
import { deletion, purgeablePredicate } from './predicates.js';
import { recordRevocations, recordUnseenRevocations } from './revocations.js';
import {
  columnOf,
  idTypeOf,
  qualifiedName,
  recordsRevocationTimes,
  type IdType,
  type TableShape,
} from './schema.js';
import { deleteMarkedRows } from './sweep/marked-rows.js';

export const MAXIMUM_BATCH_IDS = 1_000;
export const MAXIMUM_QUEUED_IDS = 20_000;
const MAXIMUM_PAYLOAD_CHARACTERS = 1_000;

export interface Revocation {
  id: string;
  /** The database time of the revocation, as the trigger sent it. */
  revokedAt: string;
}

export type CatchUpReason = 'connected' | 'bad_payload' | 'queue_full' | 'grace_due';

export interface Purger {
  /** The names a payload for this table carries: the table's, and its partitions'. */
  readonly tables: ReadonlySet<string>;
  /**
   * Validates a parsed NOTIFY payload and queues its id. Returns why a payload is not a
   * revocation of this table's (routeNotification logs it and asks for a catch-up), or null.
   */
  receive(payload: PayloadFields): string | null;
  /** Deletes every revoked row now in the table; resolves with the count once it has. */
  catchUp(reason: CatchUpReason): Promise<number>;
  /** Stops taking work and waits for the DELETE in flight, which commits or rolls back whole. */
  stop(): Promise<void>;
}

const ID_PATTERNS: Record<IdType, RegExp> = {
  uuid: /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i,
  bigint: /^-?\d{1,19}$/,
  integer: /^-?\d{1,10}$/,
  smallint: /^-?\d{1,5}$/,
  text: /^[\s\S]{1,512}$/,
  'character varying': /^[\s\S]{1,512}$/,
  character: /^[\s\S]{1,512}$/,
};

/** A payload's fields, once it is known to be a JSON object. */
export type PayloadFields = Readonly<Record<string, unknown>>;

/** The payload's fields, or why it is not the trigger's. */
export function parsePayload(
  payload: string | undefined,
): { fields: PayloadFields } | { problem: string } {
  if (payload === undefined || payload === '') return { problem: 'empty payload' };
  if (payload.length > MAXIMUM_PAYLOAD_CHARACTERS) {
    return { problem: `payload of ${payload.length} characters is too long to be the trigger's` };
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(payload);
  } catch {
    return { problem: 'payload is not JSON' };
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    return { problem: 'payload is not a JSON object' };
  }
  return { fields: parsed as PayloadFields };
}

/** The names a payload for this table may carry: a partition's trigger names the partition. */
export function payloadTables(shape: Pick<TableShape, 'relation' | 'leaves'>): Set<string> {
  return new Set([qualifiedName(shape.relation), ...shape.leaves.map(qualifiedName)]);
}

/** A revocation of this table's, or why the payload is not one. Exported for tests. */
export function parseRevocation(
  payload: string | undefined,
  shape: Pick<TableShape, 'id' | 'relation' | 'leaves'>,
): Revocation | { problem: string } {
  const parsed = parsePayload(payload);
  if ('problem' in parsed) return parsed;
  const { table } = parsed.fields;
  if (typeof table !== 'string' || !payloadTables(shape).has(table)) {
    return { problem: 'payload names another table, or none' };
  }
  return validateRevocation(parsed.fields, shape);
}

function validateRevocation(
  fields: PayloadFields,
  shape: Pick<TableShape, 'id'>,
): Revocation | { problem: string } {
  const { id, revoked_at: revokedAt } = fields;
  const idType = shape.id!.type;
  const idText = typeof id === 'number' && Number.isSafeInteger(id) ? String(id) : id;
  if (typeof idText !== 'string' || !ID_PATTERNS[idType].test(idText)) {
    return { problem: `payload id is not a valid ${idType}` };
  }
  if (typeof revokedAt !== 'string' || Number.isNaN(Date.parse(revokedAt))) {
    return { problem: 'payload revoked_at is not a timestamp' };
  }
  return { id: idText, revokedAt };
}

const batchRow = z.object({ deleted: z.number(), latencyMs: z.number().nullable() });

export function createPurger({
  pool,
  shape,
  logger,
  events = createReaperEvents(),
}: {
  pool: DatabasePool;
  shape: TableShape;
  logger: Logger;
  events?: ReaperEvents;
}): Purger {
  const log = logger.child('purge');
  const listenerLog = logger.child('listener');
  const tableName = qualifiedName(shape.relation);
  const idColumn = columnOf(shape.relation, shape.id!.column);
  const purgeable = purgeablePredicate(shape, shape.relation);

  /** id → the time of its revocation; a Map, so a repeated id is deleted once. */
  const queue = new Map<string, string>();
  let queueFull = false;
  let catchUp: { reasons: Set<CatchUpReason>; waiters: ((deleted: number) => void)[] } | null =
    null;
  let working: Promise<void> | null = null;
  let stopped = false;
  const grace = shape.marker?.graceSeconds ?? 0;
  // With a grace, a NOTIFY deletes nothing: it records the time of the revocation (a boolean
  // column has none of its own), and a catch-up on a timer deletes the rows whose grace has
  // passed, through the same grace-aware predicate as every other delete.
  const recording = recordsRevocationTimes(shape);
  const graceTimer =
    grace > 0
      ? setInterval(
          () => void requestCatchUp('grace_due'),
          Math.min(60_000, Math.max(1_000, (grace * 1000) / 4)),
        )
      : null;
  graceTimer?.unref();

  const deleteBatch = async (batch: Revocation[]) => {
    const started = performance.now();
    // The latency is measured on the database clock: from the trigger's clock_timestamp()
    // at the UPDATE to the end of this DELETE, for the oldest revocation actually deleted.
    const result = await retryOnDeadlock(() =>
      pool.one(sql.type(batchRow)`
      ${deletion(shape, shape.relation, {
        using: sql.fragment`unnest(
          ${sql.array(
            batch.map((revocation) => revocation.id),
            'text',
          )}::${idTypeOf(shape)}[],
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
    `),
    );
    const report = {
      table: tableName,
      ids: batch.length,
      deleted: result.deleted,
      durationMs: Math.round(performance.now() - started),
      latencyMs: result.latencyMs === null ? null : Math.round(result.latencyMs * 10) / 10,
    };
    log.info('purge.batch', `purged ${result.deleted} of ${batch.length} revoked tokens`, report);
    events.emit('purge', report);
  };

  const recordBatch = async (batch: Revocation[]) => {
    const started = performance.now();
    const recorded = await recordRevocations(pool, shape, batch);
    log.info('purge.recorded', `recorded ${recorded} revocation times; the grace starts there`, {
      table: tableName,
      ids: batch.length,
      recorded,
      graceSeconds: grace,
      durationMs: Math.round(performance.now() - started),
    });
  };

  const runCatchUp = async () => {
    const { reasons, waiters } = catchUp!;
    // Cleared before the work starts: a request that arrives during it gets a catch-up of
    // its own afterwards, which sees the rows this one might have missed.
    catchUp = null;
    queueFull = false;
    const started = performance.now();
    let deleted = 0;
    const fields = () => ({
      table: tableName,
      reason: [...reasons].join(','),
      deleted,
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
    try {
      for (const leaf of shape.leaves) {
        if (stopped) break;
        if (recording) await recordUnseenRevocations(pool, shape, leaf);
        await deleteMarkedRows(pool, shape, leaf, { onBatch: (rows) => (deleted += rows) });
      }
      listenerLog.info(
        'listener.caught_up',
        `caught up: ${deleted} revoked tokens deleted`,
        fields(),
      );
      emit(false);
    } catch (error) {
      listenerLog.warn(
        'listener.catch_up_failed',
        `catch-up failed after deleting ${deleted} revoked tokens; the sweep will delete the rest`,
        { ...fields(), error },
      );
      emit(true);
    }
    for (const resolve of waiters) resolve(deleted);
  };

  // One loop at a time: it drains the queue batch by batch, then runs a requested catch-up.
  const work = async () => {
    while (!stopped && (queue.size > 0 || catchUp !== null)) {
      if (queue.size > 0) {
        const batch: Revocation[] = [];
        for (const [id, revokedAt] of queue) {
          batch.push({ id, revokedAt });
          queue.delete(id);
          if (batch.length === MAXIMUM_BATCH_IDS) break;
        }
        try {
          await (recording ? recordBatch(batch) : deleteBatch(batch));
        } catch (error) {
          log.warn('purge.failed', 'purge failed; the next catch-up or sweep deletes these', {
            table: tableName,
            ids: batch.length,
            error,
          });
        }
      } else {
        await runCatchUp();
      }
    }
  };

  const start = () => {
    if (working || stopped) return;
    working = work().finally(() => {
      working = null;
    });
  };

  const requestCatchUp = (reason: CatchUpReason) => {
    catchUp ??= { reasons: new Set(), waiters: [] };
    catchUp.reasons.add(reason);
    const done = new Promise<number>((resolve) => catchUp!.waiters.push(resolve));
    start();
    return done;
  };

  return {
    tables: payloadTables(shape),
    receive(payload) {
      if (stopped) return null;
      const parsed = validateRevocation(payload, shape);
      if ('problem' in parsed) return parsed.problem;
      // A catch-up that has not started yet deletes this row too.
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
        void requestCatchUp('queue_full');
        return null;
      }
      // A timestamp column keeps its own revocation time: with a grace, nothing to do now.
      if (grace > 0 && !recording) return null;
      if (!queue.has(parsed.id)) queue.set(parsed.id, parsed.revokedAt);
      start();
      return null;
    },
    catchUp: (reason) => (stopped ? Promise.resolve(0) : requestCatchUp(reason)),
    async stop() {
      stopped = true;
      if (graceTimer) clearInterval(graceTimer);
      queue.clear();
      await working;
      // Whoever waits for a catch-up that will not run now is told that nothing was deleted.
      if (catchUp) for (const resolve of catchUp.waiters) resolve(0);
      catchUp = null;
    },
  };
}

/**
 * One LISTEN channel serves every target with the trigger: the payload names its table, and
 * goes to that table's purger. A bad payload is logged here, the one place, and caught up:
 * by its table's purger when it names one, else by every purger, since nothing in it can be
 * trusted.
 */
export function routeNotification(
  payload: string | undefined,
  purgers: readonly Purger[],
  logger: Logger,
): void {
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
  // Never the payload itself: its id may be a token hash. Its length and the reason only.
  logger.child('listener').warn('listener.bad_payload', `ignored a notification: ${problem}`, {
    problem,
    length: payload?.length ?? 0,
  });
  for (const each of purger ? [purger] : purgers) void each.catchUp('bad_payload');
}
