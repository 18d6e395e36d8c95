// Retrying, in one place: the jittered pause every retry takes, and the one way token-reaper
// waits for a lock that the auth service's own traffic might need: in short attempts. A DDL waiting in the lock queue (ACCESS EXCLUSIVE for a partition,
// SHARE ROW EXCLUSIVE for a trigger) makes every later query on the table queue behind it,
// the known failure of pg_partman and TimescaleDB retention. So each attempt runs under a
// short lock_timeout, and one that does not get its lock gives up, holding nothing, and is
// tried again after a growing, jittered pause, while the queued auth queries go on. Used by
// the sweep's partition DDL, `partition convert` and `install`.
import { setTimeout as delay } from 'node:timers/promises';
import { serializeError } from './logger.js';

const LOCK_NOT_AVAILABLE = '55P03';

export interface LockRetryPolicy {
  /** The lock_timeout of each attempt; the attempt itself sets it. */
  readonly lockTimeoutMs: number;
  /** The longest pause between two attempts, before jitter takes up to half off. */
  readonly maxPauseMs: number;
  /** Give up after this many attempts… */
  readonly attempts?: number;
  /** …or once this long has passed since the first began (the last pause is cut to fit). */
  readonly budgetMs?: number;
}

export interface LockTimeout {
  /** The attempt that gave up, from 1. */
  readonly attempt: number;
  /** Since the first attempt began. */
  readonly waitedMs: number;
  /** The pause before the next attempt, or null when this was the last one. */
  readonly pauseMs: number | null;
  readonly error: unknown;
}

/** A pause of `milliseconds` with up to half taken off, so that retries of replicas spread out. */
export function jittered(milliseconds: number): number {
  return Math.round(milliseconds * (0.5 + Math.random() / 2));
}

/**
 * Runs `attempt` until it succeeds. An attempt that fails with lock_not_available (55P03) is
 * reported to `onLockTimeout` and tried again after a pause, doubling from twice the lock
 * timeout up to maxPauseMs; any other failure is thrown. Resolves with the attempt's value,
 * or with `gaveUp` (the last LockTimeout) once the attempts or the budget are spent.
 */
export async function retryOnLockTimeout<T>(
  policy: LockRetryPolicy,
  attempt: (number: number) => Promise<T>,
  onLockTimeout: (timeout: LockTimeout) => void,
): Promise<{ value: T } | { gaveUp: LockTimeout }> {
  const started = performance.now();
  for (let number = 1; ; number += 1) {
    try {
      return { value: await attempt(number) };
    } catch (error) {
      if (serializeError(error).code !== LOCK_NOT_AVAILABLE) throw error;
      const waitedMs = Math.round(performance.now() - started);
      const left = policy.budgetMs === undefined ? Infinity : policy.budgetMs - waitedMs;
      const last = (policy.attempts !== undefined && number >= policy.attempts) || left <= 0;
      const pauseMs = last
        ? null
        : Math.min(left, jittered(Math.min(policy.maxPauseMs, policy.lockTimeoutMs * 2 ** number)));
      const timeout = { attempt: number, waitedMs, pauseMs, error };
      onLockTimeout(timeout);
      if (pauseMs === null) return { gaveUp: timeout };
      await delay(pauseMs);
    }
  }
}
