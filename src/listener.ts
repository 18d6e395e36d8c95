// LISTEN on the revoke channel, on a pg connection of its own, forever.
//
// This is a small listener of our own rather than pg-listen, because a daemon needs three
// things pg-listen does not do:
// - a LISTEN that fails (the server is a standby during a failover, the role lost CONNECT)
//   must tear the connection down and try again; pg-listen stops retrying, and its health
//   query keeps succeeding on a connection that no longer listens;
// - the heartbeat must ask the server whether it is still listening (pg_listening_channels(),
//   as pg-boss does), not just whether a query answers;
// - every failed attempt must say why, and no debug switch may print a payload, which can
//   name a token hash (pg-listen's `DEBUG=pg-listen:*` prints each one).
//
// NOTIFYs sent while the connection is down are lost for good. So after every connect, once
// LISTEN is in place (never before: a revocation between the catch-up and LISTEN would be
// missed), onConnected asks for a catch-up that deletes whatever was revoked meanwhile.
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import type { Config } from './config.js';
import { createReaperEvents, type ReaperEvents } from './events.js';
import { listenerConnectionConfig } from './db.js';
import { StandbyError } from './errors.js';
import { jittered } from './retry.js';
import { serializeError, type Logger } from './logger.js';

export const HEARTBEAT_INTERVAL_MS = 10_000;
const MAXIMUM_RECONNECT_DELAY_MS = 10_000;
const CLOSE_TIMEOUT_MS = 2_000;

export interface Listener {
  /** Connects and LISTENs; rejects if the first connection fails. */
  start(): Promise<void>;
  /** UNLISTENs and closes; nothing is received after it resolves. */
  stop(): Promise<void>;
  /** True while LISTEN is in place on a live connection. */
  readonly connected: boolean;
  /** True while the last attempt found a standby: the daemon waits for a primary. */
  readonly standby: boolean;
  /** How long the listener has been without LISTEN in place since it last had it; 0 while it has. */
  downForMs(): number;
}

export interface ListenerOptions {
  config: Pick<Config, 'databaseUrl' | 'notifyChannel'>;
  logger: Logger;
  onNotification: (payload: string | undefined) => void;
  /** Called after every successful connect, with LISTEN already in place. */
  onConnected: (reconnected: boolean) => void;
  events?: ReaperEvents;
  /** How often the connection is asked whether it still listens; for tests. */
  heartbeatIntervalMs?: number;
}

/** 250 ms doubling to 10 s, each delay drawn from its upper half so replicas spread out. */
export function reconnectDelay(attempt: number) {
  return jittered(Math.min(MAXIMUM_RECONNECT_DELAY_MS, 250 * 2 ** attempt));
}

export function createListener({
  config,
  logger,
  onNotification,
  onConnected,
  events = createReaperEvents(),
  heartbeatIntervalMs = HEARTBEAT_INTERVAL_MS,
}: ListenerOptions): Listener {
  const log = logger.child('listener');
  const channel = config.notifyChannel;
  let client: pg.Client | null = null;
  let connected = false;
  let standby = false;
  let stopped = false;
  // Down from creation until the first LISTEN: /healthz counts a start that never connects.
  let disconnectedAt = performance.now();
  let heartbeat: NodeJS.Timeout | null = null;
  /** The reconnect loop in progress, so a second loss during it starts nothing new. */
  let reconnecting: Promise<void> | null = null;

  /** A new connection with LISTEN in place; a failure closes whatever it opened. */
  const connect = async () => {
    const candidate = new pg.Client(listenerConnectionConfig(config));
    // Until it is ours, an error only fails the attempt; afterwards it is a lost connection.
    candidate.on('error', (error) => {
      if (client === candidate) lose(error);
    });
    candidate.on('end', () => {
      if (client === candidate) lose(new Error('the connection ended'));
    });
    candidate.on('notification', (message) => {
      if (client === candidate && !stopped && message.channel === channel) {
        onNotification(message.payload);
      }
    });
    try {
      await candidate.connect();
      // A standby refuses LISTEN; after a failover the old primary may come back as one.
      const recovery = await candidate.query<{ standby: boolean }>(
        'SELECT pg_is_in_recovery() AS standby',
      );
      if (recovery.rows[0]?.standby === true) throw new StandbyError();
      await candidate.query(`LISTEN ${pg.escapeIdentifier(channel)}`);
    } catch (error) {
      void candidate.end().catch(() => undefined);
      throw error;
    }
    return candidate;
  };

  const listening = (reconnected: boolean) => {
    connected = true;
    standby = false;
    events.emit('listener', { connected: true });
    log.info(
      'listener.connected',
      reconnected ? `listening on ${channel} again` : `listening on ${channel}`,
      reconnected
        ? { channel, reconnected, downMs: Math.round(performance.now() - disconnectedAt) }
        : { channel, reconnected },
    );
    heartbeat = setInterval(() => void checkHeartbeat(), heartbeatIntervalMs);
    heartbeat.unref();
    onConnected(reconnected);
  };

  // The query has the connection's query_timeout, so a half-open connection fails it too.
  const checkHeartbeat = async () => {
    const current = client;
    if (current === null || stopped) return;
    try {
      const result = await current.query<{ listening: boolean }>(
        'SELECT $1::text = ANY (ARRAY(SELECT pg_listening_channels())) AS listening',
        [channel],
      );
      if (result.rows[0]?.listening !== true) {
        throw new Error(`the connection no longer listens on ${channel}`);
      }
    } catch (error) {
      if (client === current) lose(error);
    }
  };

  /** Drops the connection, once, and reconnects until it listens again or stop() is called. */
  const lose = (error: unknown) => {
    if (stopped || client === null) return;
    const lost = client;
    client = null;
    if (heartbeat) clearInterval(heartbeat);
    heartbeat = null;
    void lost.end().catch(() => undefined);
    connected = false;
    disconnectedAt = performance.now();
    events.emit('listener', { connected: false });
    log.warn('listener.disconnected', 'the listener lost its connection; reconnecting', {
      channel,
      error: serializeError(error),
    });
    reconnecting ??= reconnect().finally(() => {
      reconnecting = null;
    });
  };

  const reconnect = async () => {
    for (let attempt = 1; !stopped; attempt += 1) {
      await delay(reconnectDelay(attempt - 1), undefined, { ref: false });
      if (stopped) return;
      try {
        const candidate = await connect();
        if (stopped) {
          void candidate.end().catch(() => undefined);
          return;
        }
        client = candidate;
        listening(true);
        return;
      } catch (error) {
        if (error instanceof StandbyError && !standby) {
          standby = true;
          log.warn('database.standby', 'the database is a standby; waiting for a primary', {
            channel,
          });
        }
        // Every failure says why: a rotated password, a standby, a host that is gone.
        log.warn('listener.reconnecting', `reconnecting failed, attempt ${attempt}`, {
          channel,
          attempt,
          downMs: Math.round(performance.now() - disconnectedAt),
          error: serializeError(error),
        });
      }
    }
  };

  return {
    get connected() {
      return connected && !stopped;
    },
    get standby() {
      return standby && !stopped;
    },
    downForMs: () => (connected || stopped ? 0 : Math.round(performance.now() - disconnectedAt)),
    async start() {
      client = await connect();
      listening(false);
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      connected = false;
      if (heartbeat) clearInterval(heartbeat);
      events.emit('listener', { connected: false });
      const current = client;
      client = null;
      if (current === null) return;
      // UNLISTEN before anything else stops, so nothing new arrives during the shutdown. On a
      // dead connection neither may ever answer; the shutdown does not wait for them.
      const close = async () => {
        await current.query('UNLISTEN *').catch(() => undefined);
        await current.end().catch(() => undefined);
      };
      await Promise.race([close(), delay(CLOSE_TIMEOUT_MS, undefined, { ref: false })]);
    },
  };
}
