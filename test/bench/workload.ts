// An auth-service-like workload, run beside each contender to see what a cleanup costs the
// service it cleans up after. Each client is its own connection and loops over three kinds of
// operation, at a fixed pace:
//
// - lookup (60%): SELECT by token_hash, what the refresh endpoint does first;
// - insert (20%): a new login issues a token;
// - rotate (20%): a refresh revokes the presented token and issues its successor, in one
//   transaction. It revokes only tokens this client issued, so the rows that existed before the
//   contender started keep their state, and the correctness check can count them exactly.
//
// The pace is open-loop: operation i is due at start + i × interval. When an operation is due
// while the previous one is still running, its latency is counted from when it was due, not
// from when it could start (the coordinated-omission correction): a client stalled for 50 ms
// by a lock reports the wait of every request that queued up behind it, as users would feel
// it. Timer lateness, on the other hand, is the benchmark's own noise and is not counted.
//
// The workload is bounded in time and in count, so it can never run away.
import { randomUUID } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import { setTimeout as delay } from 'node:timers/promises';

import pg from 'pg';

import { maximum, percentile } from './statistics.js';

/** Every token the workload issues has a hash with this prefix; the template's never do. */
export const WORKLOAD_HASH_PREFIX = 'bench:';

const OPERATION_SHARES = { lookup: 0.6, insert: 0.2, rotate: 0.2 } as const;
/** Lookups of a token this client issued, versus one that existed before. */
const OWN_TOKEN_LOOKUP_SHARE = 0.3;
const STATEMENT_TIMEOUT_MS = 30_000;
const WARM_UP_ROUNDS = 3;

export type OperationKind = keyof typeof OPERATION_SHARES;

export interface OperationSample {
  /** performance.now() when the operation was due, or started if it started on time. */
  readonly startedAt: number;
  readonly latencyMs: number;
  readonly kind: OperationKind;
  readonly failed: boolean;
}

export interface WorkloadOptions {
  readonly url: string;
  /** Quoted table name. */
  readonly table: string;
  readonly clients: number;
  readonly operationsPerSecondPerClient: number;
  /** Hashes of live tokens that existed before, for lookups. */
  readonly lookupHashes: readonly string[];
  /** A run stops after this long even when nobody stops it. */
  readonly maximumDurationMs: number;
}

export interface WorkloadRecording {
  readonly samples: readonly OperationSample[];
  /**
   * The transaction ids of every write, as text, so that the WAL they wrote can be told
   * apart from the contender's (see scenarios.ts).
   */
  readonly transactionIds: ReadonlySet<string>;
}

export interface RunningWorkload {
  /** Stops the clients after their operation in flight. */
  stop(): Promise<WorkloadRecording>;
}

export interface Workload {
  /**
   * A few operations of every kind on every connection, unmeasured: the first ones pay for
   * the backend's catalog caches and the prepared statements (on a table with 60 partitions,
   * tens of milliseconds), which would otherwise be the at-rest p99.
   */
  warmUp(): Promise<void>;
  start(): RunningWorkload;
  runFor(durationMs: number): Promise<WorkloadRecording>;
  close(): Promise<void>;
}

export interface WorkloadSummary {
  readonly operations: number;
  readonly failed: number;
  readonly operationsPerSecond: number | null;
  readonly p50Ms: number | null;
  readonly p99Ms: number | null;
  readonly maxMs: number | null;
  readonly p99MsByKind: Readonly<Record<OperationKind, number | null>>;
}

export async function connectWorkload(options: WorkloadOptions): Promise<Workload> {
  const clients = await Promise.all(
    Array.from({ length: options.clients }, async () => {
      const client = new pg.Client({
        connectionString: options.url,
        application_name: 'token-reaper-bench-workload',
        statement_timeout: STATEMENT_TIMEOUT_MS,
      });
      client.on('error', () => undefined);
      await client.connect();
      return client;
    }),
  );
  // Tokens each client issued and has not rotated yet; they survive from run to run.
  const issued = clients.map((): IssuedToken[] => []);

  const start = (): RunningWorkload => {
    const stopping = new AbortController();
    // Every client waits on it at once; that is no leak.
    setMaxListeners(clients.length, stopping.signal);
    const samples: OperationSample[] = [];
    const transactionIds = new Set<string>();
    const deadline = setTimeout(() => stopping.abort(), options.maximumDurationMs);
    const intervalMs = 1000 / options.operationsPerSecondPerClient;
    const maximumOperations = Math.ceil(
      (options.maximumDurationMs / 1000) * options.operationsPerSecondPerClient,
    );
    const loops = clients.map((client, index) =>
      runPaced({
        intervalMs,
        count: maximumOperations,
        signal: stopping.signal,
        step: async () => {
          const kind = chooseOperation();
          try {
            const transactionId = await OPERATIONS[kind](client, options, issued[index]!);
            if (transactionId !== null) transactionIds.add(transactionId);
            return { kind, failed: false };
          } catch {
            return { kind, failed: true };
          }
        },
        record: (sample) => samples.push(sample),
      }),
    );
    return {
      async stop() {
        stopping.abort();
        clearTimeout(deadline);
        await Promise.all(loops);
        return { samples, transactionIds };
      },
    };
  };

  return {
    async warmUp() {
      await Promise.all(
        clients.map(async (client, index) => {
          for (let round = 0; round < WARM_UP_ROUNDS; round += 1) {
            for (const kind of ['insert', 'lookup', 'rotate'] as const) {
              await OPERATIONS[kind](client, options, issued[index]!);
            }
          }
        }),
      );
    },
    start,
    async runFor(durationMs) {
      const running = start();
      await delay(durationMs);
      return running.stop();
    },
    async close() {
      await Promise.all(clients.map((client) => client.end().catch(() => undefined)));
    },
  };
}

/** The samples whose operation was due within [from, to], summarized. */
export function summarizeWorkload(
  samples: readonly OperationSample[],
  window: { from: number; to: number } = { from: -Infinity, to: Infinity },
): WorkloadSummary {
  const inWindow = samples.filter(
    (sample) => sample.startedAt >= window.from && sample.startedAt <= window.to,
  );
  const latencies = inWindow.map((sample) => sample.latencyMs);
  const byKind = (kind: OperationKind) =>
    percentile(
      inWindow.filter((sample) => sample.kind === kind).map((sample) => sample.latencyMs),
      0.99,
    );
  const seconds = Number.isFinite(window.to - window.from) ? (window.to - window.from) / 1000 : 0;
  return {
    operations: inWindow.length,
    failed: inWindow.filter((sample) => sample.failed).length,
    operationsPerSecond: seconds > 0 ? inWindow.length / seconds : null,
    p50Ms: percentile(latencies, 0.5),
    p99Ms: percentile(latencies, 0.99),
    maxMs: maximum(latencies),
    p99MsByKind: { lookup: byKind('lookup'), insert: byKind('insert'), rotate: byKind('rotate') },
  };
}

export interface TimeSpan {
  readonly from: number;
  readonly to: number;
}

/** The operations of a window, split by whether they overlapped one of the contender's batches. */
export interface WorkloadByBatch {
  /** Ran, at least in part, while a batch did. */
  readonly inBatches: WorkloadSummary;
  /** Ran wholly between batches: in the sweep's pauses, or its walk between them. */
  readonly betweenBatches: WorkloadSummary;
  /** The share of the window's time inside batches. */
  readonly busyShare: number | null;
}

/**
 * Where the slow operations of a window fall: in the contender's batches (they waited for its
 * locks, its WAL flush, its share of the CPU), or between them (what the batches leave behind:
 * dirty pages, the server's background work). An operation's span is from when it was due to
 * when it ended, as its latency counts it.
 */
export function splitByBatch(
  samples: readonly OperationSample[],
  window: TimeSpan,
  batches: readonly TimeSpan[],
): WorkloadByBatch {
  const sorted = [...batches].sort((left, right) => left.from - right.from);
  // The batches run one after another, so the last one to start before an operation ended is
  // the last one that can have overlapped it; if it ended before the operation was due, so
  // did every one before it.
  const overlaps = (sample: OperationSample) => {
    const last = sorted[lastStartingBefore(sorted, sample.startedAt + sample.latencyMs)];
    return last !== undefined && last.to >= sample.startedAt;
  };
  const inWindow = samples.filter(
    (sample) => sample.startedAt >= window.from && sample.startedAt <= window.to,
  );
  const busyMs = sorted.reduce(
    (sum, batch) =>
      sum + Math.max(0, Math.min(batch.to, window.to) - Math.max(batch.from, window.from)),
    0,
  );
  return {
    inBatches: summarizeWorkload(inWindow.filter(overlaps)),
    betweenBatches: summarizeWorkload(inWindow.filter((sample) => !overlaps(sample))),
    busyShare: window.to > window.from ? busyMs / (window.to - window.from) : null,
  };
}

/** The index of the last span starting at or before `time`, or -1 (binary search). */
function lastStartingBefore(sorted: readonly TimeSpan[], time: number): number {
  let low = 0;
  let high = sorted.length - 1;
  let found = -1;
  while (low <= high) {
    const middle = (low + high) >> 1;
    if (sorted[middle]!.from <= time) {
      found = middle;
      low = middle + 1;
    } else {
      high = middle - 1;
    }
  }
  return found;
}

export interface PacedLoop<Outcome> {
  readonly intervalMs: number;
  /** At most this many steps. */
  readonly count: number;
  /** Ends the loop early, after the step in flight. */
  readonly signal?: AbortSignal;
  readonly step: (index: number) => Promise<Outcome>;
  /** Called after every step with its latency, corrected as the header explains. */
  readonly record?: (sample: Outcome & { startedAt: number; latencyMs: number }) => void;
}

/**
 * Runs `step` every `intervalMs`, never two at once. A step that is due while the previous one
 * still runs starts as soon as that one ends, so a slow step delays, but never drops, the ones
 * after it.
 */
export async function runPaced<Outcome>(loop: PacedLoop<Outcome>): Promise<void> {
  const begin = performance.now();
  let previousEnd = -Infinity;
  for (let index = 0; index < loop.count && !loop.signal?.aborted; index += 1) {
    const due = begin + index * loop.intervalMs;
    const wait = due - performance.now();
    if (wait > 0) {
      await delay(wait, undefined, { signal: loop.signal }).catch(() => undefined);
      if (loop.signal?.aborted) break;
    }
    const startedAt = previousEnd > due ? due : performance.now();
    const outcome = await loop.step(index);
    previousEnd = performance.now();
    loop.record?.({ ...outcome, startedAt, latencyMs: previousEnd - startedAt });
  }
}

function chooseOperation(): OperationKind {
  const draw = Math.random();
  if (draw < OPERATION_SHARES.lookup) return 'lookup';
  return draw < OPERATION_SHARES.lookup + OPERATION_SHARES.insert ? 'insert' : 'rotate';
}

/** A token a client holds, and the transaction that issued it. */
interface IssuedToken {
  readonly id: string;
  readonly hash: string;
  readonly transactionId: string;
}

/** Each operation resolves with the id of the transaction it wrote in, or null for a read. */
const OPERATIONS: Record<
  OperationKind,
  (client: pg.Client, options: WorkloadOptions, issued: IssuedToken[]) => Promise<string | null>
> = {
  async lookup(client, options, issued) {
    const own = issued.length > 0 && Math.random() < OWN_TOKEN_LOOKUP_SHARE;
    const hash = own
      ? issued[Math.floor(Math.random() * issued.length)]!.hash
      : options.lookupHashes[Math.floor(Math.random() * options.lookupHashes.length)]!;
    await client.query({
      name: 'bench-lookup',
      text: `SELECT id, user_id, revoked, expires_at FROM ${options.table} WHERE token_hash = $1`,
      values: [hash],
    });
    return null;
  },
  async insert(client, options, issued) {
    const token = await issue(client, options.table, randomUUID());
    issued.push(token);
    return token.transactionId;
  },
  async rotate(client, options, issued) {
    if (issued.length === 0) {
      const token = await issue(client, options.table, randomUUID());
      issued.push(token);
      return token.transactionId;
    }
    // Swap-remove a random token: the client presents it once, and it is gone from its hand.
    const index = Math.floor(Math.random() * issued.length);
    const { id } = issued[index]!;
    issued[index] = issued[issued.length - 1]!;
    issued.pop();
    await client.query('BEGIN');
    try {
      const revoked = await client.query<{ user_id: string }>({
        name: 'bench-revoke',
        text: `UPDATE ${options.table} SET revoked = true WHERE id = $1 AND NOT revoked
               RETURNING user_id`,
        values: [id],
      });
      const successor = await issue(
        client,
        options.table,
        revoked.rows[0]?.user_id ?? randomUUID(),
      );
      await client.query('COMMIT');
      issued.push(successor);
      return successor.transactionId;
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    }
  },
};

async function issue(client: pg.Client, table: string, userId: string): Promise<IssuedToken> {
  const hash = `${WORKLOAD_HASH_PREFIX}${randomUUID()}`;
  const result = await client.query<{ id: string; transaction_id: string }>({
    name: 'bench-issue',
    text: `INSERT INTO ${table} (user_id, token_hash, expires_at)
           VALUES ($1, $2, now() + interval '30 days')
           RETURNING id, pg_current_xact_id()::xid::text AS transaction_id`,
    values: [userId, hash],
  });
  const row = result.rows[0]!;
  return { id: row.id, hash, transactionId: row.transaction_id };
}
