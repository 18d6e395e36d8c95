// What the daemon reports besides its log lines, as typed events: the library API hands
// them to embedding code, and the metrics are counted from them. One emitter is made at the
// edge (the CLI or createReaper) and passed inward like the logger; components emit, and
// never depend on who listens.
import { EventEmitter } from 'node:events';
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
}

export interface ReaperEventMap {
  /** Every sweep's outcome: finished, skipped or failed. */
  sweep: [SweepOutcome];
  progress: [SweepProgressEvent];
  purge: [PurgeBatchEvent];
  catchUp: [CatchUpEvent];
  /** The listener connected (LISTEN in place) or lost its connection. */
  listener: [{ connected: boolean }];
}

export type ReaperEvents = EventEmitter<ReaperEventMap>;

export function createReaperEvents(): ReaperEvents {
  return new EventEmitter<ReaperEventMap>();
}
