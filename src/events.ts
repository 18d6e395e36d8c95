// What the daemon reports besides its log lines, as typed events: the library API hands
// them to embedding code, and the metrics are counted from them. One emitter is made at the
// edge (the CLI or createReaper) and passed inward like the logger; components emit, and
// never depend on who listens.
import { EventEmitter } from 'node:events';
import type { Logger } from './logger.js';
import type { CatchUpReason } from './purge/purger.js';
import type { SweepOutcome } from './sweep/sweeper.js';

export interface PurgeBatchEvent {
  table: string;
  ids: number;
  deleted: number;
  durationMs: number;
  /** Revocation to deletion for the oldest row deleted, on the database clock; null if none. */
  latencyMs: number | null;
}

export interface CatchUpEvent {
  table: string;
  deleted: number;
  reasons: CatchUpReason[];
  durationMs: number;
  failed: boolean;
}

export interface SweepProgressEvent {
  table: string;
  pagesDone: number;
  pagesTotal: number;
  deleted: number;
  rowsPerSecond: number;
  /** Seconds left at the current rate, or null before there is a rate. */
  etaSeconds: number | null;
  /** SWEEP_MAX_REPLICA_LAG: the consumer the sweep is paused for now, or null. */
  throttled: { source: string; lagMs: number; lagBytes: number } | null;
}

/** SWEEP_MAX_REPLICA_LAG: the sweep paused for a consumer's lag, or went on after the pause. */
export interface SweepThrottleEvent {
  throttled: boolean;
  /** `standby <application_name>` or `logical slot <slot_name>`. */
  source: string;
  lagMs: number;
  lagBytes: number;
  /** When the pause ends: how long it lasted. */
  pausedMs?: number;
}

/** A retry of the rows a finished sweep left locked (sweep/sweeper.ts). */
export interface SweepRetryEvent {
  attempt: number;
  /** Rows deleted by this retry, by table. */
  deleted: Record<string, number>;
  /** Rows still locked after it. */
  skipped: number;
}

export interface WalSlotEvent {
  slot: string;
  /** WAL the slot keeps from removal, in bytes; null when the slot is missing. */
  retainedBytes: number | null;
  lost: boolean;
}

export interface ReaperEventMap {
  /** Every sweep's outcome: finished, skipped or failed. */
  sweep: [SweepOutcome];
  progress: [SweepProgressEvent];
  sweepRetry: [SweepRetryEvent];
  sweepThrottle: [SweepThrottleEvent];
  purge: [PurgeBatchEvent];
  catchUp: [CatchUpEvent];
  /** The listener connected (LISTEN in place) or lost its connection. */
  listener: [{ connected: boolean }];
  /** PURGE_SOURCE=wal: the slot's state, read every 10 s. */
  walSlot: [WalSlotEvent];
}

export type ReaperEvents = EventEmitter<ReaperEventMap>;

/**
 * An emitter whose listeners cannot hurt the emitter. Node's EventEmitter runs listeners
 * synchronously inside emit(), so a listener that throws (a library user's bug, say) would
 * throw out of the purge or the sweep that emitted, and a listener that returns a rejected
 * promise would leave an unhandled rejection. Here each listener runs on its own; what it
 * throws or rejects goes to `onListenerFailed`, and the other listeners still run.
 */
class ShieldedEmitter extends EventEmitter<ReaperEventMap> {
  constructor(private readonly onListenerFailed: (event: string, error: unknown) => void) {
    super();
  }

  override emit<K extends keyof ReaperEventMap>(event: K, ...args: ReaperEventMap[K]): boolean {
    // rawListeners keeps once() wrappers, which remove themselves when called.
    const listeners = this.rawListeners(event) as ((...values: unknown[]) => unknown)[];
    for (const listener of listeners) {
      try {
        const result = listener.apply(this, args);
        if (result instanceof Promise) {
          result.catch((error: unknown) => this.onListenerFailed(event, error));
        }
      } catch (error) {
        this.onListenerFailed(event, error);
      }
    }
    return listeners.length > 0;
  }
}

/** The emitter; a listener's failure is logged as `events.listener_failed` when there is a logger. */
export function createReaperEvents(logger?: Logger): ReaperEvents {
  const log = logger?.child('events');
  return new ShieldedEmitter((event, error) => {
    if (log) {
      log.error('events.listener_failed', `a listener of the "${event}" event failed`, {
        emitted: event,
        error: error instanceof Error ? error : new Error(String(error)),
      });
    } else {
      process.emitWarning(
        `a listener of the token-reaper "${event}" event failed: ${String(error)}`,
      );
    }
  });
}
