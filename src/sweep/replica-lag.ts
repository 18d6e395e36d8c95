// SWEEP_MAX_REPLICA_LAG: the sweep waits for the standbys and the logical consumers.
//
// A sweep of a large backlog writes WAL as fast as the primary takes it; a standby that
// replays slower, or a logical consumer (CDC, a search index) that decodes slower, falls
// behind, and a standby serving reads serves stale ones. Before each batch (from a reading at
// most READ_INTERVAL_MS old) the gate reads, on the primary, where every streaming standby
// has replayed to and where every active logical slot has confirmed, and while one of them is
// further behind than the limit the sweep pauses, logging `sweep.throttled` once per pause.
//
// The lag is measured in time, as the limit is: how long ago the primary's WAL was where the
// consumer now is. pg_stat_replication's replay_lag cannot say that: it is computed only when
// the standby reports progress, so a standby whose replay has stopped keeps the lag it had
// when it stopped, and one that has caught up keeps showing its last lag until its next
// report. The gate therefore samples the primary's WAL position with the time at every
// reading, and looks up when the primary passed the consumer's position; replay_lag only
// speaks for a position older than the first sample. A consumer at the primary's position
// has no lag. Its limit: a standby reports where it is when WAL arrives
// and otherwise every wal_receiver_status_interval (10 s by default), so on a primary that
// writes nothing else, a pause may outlast the lag by up to that interval.
//
// Disconnected standbys and inactive slots are not waited for: nobody knows when they come
// back, and a sweep that waits for them never ends. For the same reason a pause gives up
// after MAX_PAUSE_MS (or three times the limit, if longer) and ends the sweep as partial,
// the next one resuming where it stopped: a standby whose replay was paused by hand, or one
// delayed on purpose (recovery_min_apply_delay over the limit), is always behind, and a
// sweep held for good would keep the sweep lock, and every later sweep, from running. The daemon's own slot (PURGE_WAL_SLOT) is
// left out too: it acknowledges once a second by design, and the sweep's deletes are not in
// its publication.
//
// Reading another session's replication state needs pg_read_all_stats (in pg_monitor). A
// role without it gets NULL positions, so the gate warns once and lets the sweep run;
// `install --role` grants pg_monitor when SWEEP_MAX_REPLICA_LAG is set.
import { setTimeout as delay } from 'node:timers/promises';
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import type { ReaperEvents } from '../events.js';
import type { Logger } from '../logger.js';

/** A fresh reading for every batch would cost more than it tells: a few a second suffice. */
export const READ_INTERVAL_MS = 200;
/** The longest pause before the sweep gives up and ends as partial (see above). */
export const MAX_PAUSE_MS = 15 * 60_000;
/** Samples of the primary's position older than this are dropped. */
const SAMPLE_HISTORY_MS = 10 * 60_000;

export interface ReplicaLag {
  /** `standby <application_name>` or `logical slot <slot_name>`. */
  source: string;
  lagMs: number;
  /** How far the consumer is behind the primary's WAL position. */
  lagBytes: number;
}

export interface ReplicaGate {
  /** Resolves once no consumer is behind the limit, or `signal` aborts. */
  wait(signal: AbortSignal): Promise<void>;
  /** The lag the sweep is paused for now, or null. */
  throttledBy(): ReplicaLag | null;
}

const readingRow = z.object({
  current: z.string(),
  readable: z.boolean(),
  consumers: z.array(
    z.object({ source: z.string(), lsn: z.string().nullable(), lagMs: z.number().nullable() }),
  ),
});

/** An LSN such as `16/B374D848` as a number of bytes. */
export function lsnBytes(lsn: string): bigint {
  const [high, low] = lsn.split('/');
  return (BigInt(`0x${high}`) << 32n) + BigInt(`0x${low}`);
}

export interface ReplicaGateSettings {
  pool: DatabasePool;
  maxLagMs: number;
  /** PURGE_WAL_SLOT, whose lag is the daemon's own. */
  ownSlot: string;
  logger: Logger;
  events: ReaperEvents;
  /** Called when the role cannot read the lag; the gate then stays open for this sweep. */
  onUnreadable: () => void;
  /** A pause longer than this gives up: onGaveUp is called, and the wait ends. */
  maxPauseMs: number;
  /** The sweeper ends the sweep as partial: one stuck standby must not hold it for good. */
  onGaveUp: (lag: ReplicaLag, pausedMs: number) => void;
}

export function createReplicaGate(settings: ReplicaGateSettings): ReplicaGate {
  const { pool, maxLagMs, logger, events } = settings;
  const samples: { at: number; lsn: bigint }[] = [];
  let readAt = -Infinity;
  let unreadable = false;
  let throttled: ReplicaLag | null = null;

  /**
   * How long ago the primary's WAL passed `lsn`, by the samples. A position from before the
   * first sample is at least as old as it; there, and only there, replay_lag (which can be
   * stale: it stands still between a standby's reports) may tell more.
   */
  const lagOf = (lsn: bigint, now: number, reportedLagMs: number | null) => {
    const passing = samples.find((sample) => sample.lsn > lsn);
    if (passing !== undefined && passing !== samples[0]) return now - passing.at;
    return Math.max(now - (samples[0]?.at ?? now), reportedLagMs ?? 0);
  };

  /** The consumer furthest behind, or null when none is. */
  const read = async (): Promise<ReplicaLag | null> => {
    const reading = await pool.one(sql.type(readingRow)`
      SELECT pg_current_wal_lsn()::text AS current,
             pg_has_role('pg_read_all_stats', 'USAGE') AS readable,
             coalesce((
               SELECT json_agg(consumer) FROM (
                 SELECT CASE WHEN slot.slot_type = 'logical'
                             THEN 'logical slot ' || slot.slot_name
                             ELSE 'standby ' || coalesce(nullif(sender.application_name, ''),
                                                         sender.client_addr::text,
                                                         sender.pid::text)
                        END AS source,
                        coalesce(slot.confirmed_flush_lsn, sender.replay_lsn)::text AS lsn,
                        extract(epoch FROM sender.replay_lag)::float8 * 1000 AS "lagMs"
                 FROM pg_stat_replication AS sender
                 LEFT JOIN pg_replication_slots AS slot ON slot.active_pid = sender.pid
                 WHERE sender.state IN ('streaming', 'catchup')
                   AND slot.slot_name IS DISTINCT FROM ${settings.ownSlot}
               ) AS consumer
             ), '[]'::json) AS consumers
    `);
    const now = performance.now();
    const current = lsnBytes(reading.current);
    if (samples.at(-1)?.lsn !== current) samples.push({ at: now, lsn: current });
    while (samples.length > 1 && now - samples[0]!.at > SAMPLE_HISTORY_MS) samples.shift();
    if (!reading.readable) {
      unreadable = true;
      settings.onUnreadable();
      return null;
    }
    let furthest: ReplicaLag | null = null;
    for (const consumer of reading.consumers) {
      // A slot being made has no position yet.
      if (consumer.lsn === null) continue;
      const position = lsnBytes(consumer.lsn);
      const behind = current > position;
      // Caught up is caught up, whatever a stale replay_lag still says.
      const lagMs = behind ? lagOf(position, now, consumer.lagMs) : 0;
      if (lagMs > (furthest?.lagMs ?? -1)) {
        furthest = {
          source: consumer.source,
          lagMs: Math.round(lagMs),
          lagBytes: behind ? Number(current - position) : 0,
        };
      }
    }
    return furthest;
  };

  const over = (lag: ReplicaLag | null) => (lag !== null && lag.lagMs > maxLagMs ? lag : null);

  const waitUntilCaughtUp = async (signal: AbortSignal) => {
    let paused: { since: number; lag: ReplicaLag } | null = null;
    try {
      while (!signal.aborted) {
        readAt = performance.now();
        const lag = over(await read());
        if (lag === null) break;
        throttled = lag;
        if (paused === null) {
          paused = { since: performance.now(), lag };
          logger.warn(
            'sweep.throttled',
            `the sweep pauses: ${lag.source} is ${lag.lagMs} ms behind, over SWEEP_MAX_REPLICA_LAG (${maxLagMs} ms)`,
            { ...lag, maxLagMs },
          );
          events.emit('sweepThrottle', { throttled: true, ...lag });
        }
        if (performance.now() - paused.since > settings.maxPauseMs) {
          settings.onGaveUp(lag, Math.round(performance.now() - paused.since));
          return;
        }
        await delay(READ_INTERVAL_MS, undefined, { signal }).catch(() => undefined);
      }
    } finally {
      throttled = null;
      if (paused !== null) {
        const pausedMs = Math.round(performance.now() - paused.since);
        events.emit('sweepThrottle', { throttled: false, ...paused.lag, pausedMs });
        if (!signal.aborted) {
          logger.info(
            'sweep.unthrottled',
            `the sweep goes on after a pause of ${pausedMs} ms for ${paused.lag.source}`,
            { source: paused.lag.source, pausedMs },
          );
        }
      }
    }
  };

  // Concurrent workers share one wait, and so one reading and one `sweep.throttled` line; a
  // worker that comes while another waits waits too.
  let waiting: Promise<void> | null = null;
  return {
    wait(signal) {
      if (waiting !== null) return waiting;
      if (unreadable || performance.now() - readAt < READ_INTERVAL_MS) return Promise.resolve();
      waiting = waitUntilCaughtUp(signal).finally(() => {
        waiting = null;
      });
      return waiting;
    },
    throttledBy: () => throttled,
  };
}
