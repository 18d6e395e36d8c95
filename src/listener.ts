// LISTEN on the revoke channel, through pg-listen, on a connection of its own, forever.
//
// pg-listen's defaults are wrong for a daemon (DESIGN.md, "Pitfalls"), so every one of them
// is set here:
// - retryTimeout: it gives up reconnecting after 3 s by default, and then the daemon would
//   be deaf until restarted. Here it never gives up, with a jittered exponential backoff;
// - paranoidChecking runs `SELECT pg_backend_pid()` on the connection, which can hang
//   forever on a half-open TCP connection; the client's query_timeout bounds it, and TCP
//   keepalive catches a peer that vanished without a word;
// - its `error` event is always handled, and its JSON parse is replaced by the raw payload,
//   which the purger validates itself.
//
// NOTIFYs sent while the connection is down are lost for good. So after every connect, once
// LISTEN is in place (never before: a revocation between the catch-up and LISTEN would be
// missed), onConnected asks for a catch-up that deletes whatever was revoked meanwhile.
import pgListen from 'pg-listen';
import type { Config } from './config.js';
import { createReaperEvents, type ReaperEvents } from './events.js';
import { listenerConnectionConfig } from './db.js';
import type { Logger } from './logger.js';

export const PARANOID_CHECK_INTERVAL_MS = 10_000;
const MAXIMUM_RECONNECT_DELAY_MS = 10_000;
const CLOSE_TIMEOUT_MS = 2_000;

export interface Listener {
  /** Connects and LISTENs; rejects if the first connection fails. */
  start(): Promise<void>;
  /** UNLISTENs and closes; nothing is received after it resolves. */
  stop(): Promise<void>;
  /** True while LISTEN is in place on a live connection. */
  readonly connected: boolean;
}

export interface ListenerOptions {
  config: Pick<Config, 'databaseUrl' | 'notifyChannel'>;
  logger: Logger;
  onNotification: (payload: string | undefined) => void;
  /** Called after every successful connect, with LISTEN already in place. */
  onConnected: (reconnected: boolean) => void;
  events?: ReaperEvents;
}

/** 250 ms doubling to 10 s, each delay drawn from its upper half so replicas spread out. */
export function reconnectDelay(attempt: number) {
  const ceiling = Math.min(MAXIMUM_RECONNECT_DELAY_MS, 250 * 2 ** attempt);
  return Math.round(ceiling * (0.5 + Math.random() / 2));
}

// pg-listen is CommonJS with an `exports.default`; under Node's ESM loader the default
// import is the whole exports object.
const createSubscriber = pgListen.default;

export function createListener({
  config,
  logger,
  onNotification,
  onConnected,
  events = createReaperEvents(),
}: ListenerOptions): Listener {
  const log = logger.child('listener');
  const channel = config.notifyChannel;
  const subscriber = createSubscriber(listenerConnectionConfig(config), {
    retryTimeout: Number.POSITIVE_INFINITY,
    retryLimit: Number.POSITIVE_INFINITY,
    retryInterval: reconnectDelay,
    paranoidChecking: PARANOID_CHECK_INTERVAL_MS,
    parse: (payload: string) => payload,
  });
  let connected = false;
  let listening = false;
  let stopped = false;
  let disconnectedAt = 0;

  subscriber.notifications.on(channel, (payload: string | undefined) => {
    if (!stopped) onNotification(payload);
  });
  subscriber.events.on('error', (error) => {
    log.warn('listener.error', 'the listener connection reported an error', { error });
  });
  subscriber.events.on('reconnect', (attempt) => {
    if (attempt === 1) {
      connected = false;
      events.emit('listener', { connected: false });
      disconnectedAt = performance.now();
      log.warn('listener.disconnected', 'the listener lost its connection; reconnecting', {
        channel,
      });
    } else if (attempt % 10 === 0) {
      log.warn('listener.reconnecting', `still reconnecting, attempt ${attempt}`, {
        channel,
        attempt,
        downMs: Math.round(performance.now() - disconnectedAt),
      });
    }
  });
  // pg-listen emits `connected` on the first connect before any LISTEN, and after each
  // reconnect once it has re-LISTENed. Only the second kind is handled here; start() takes
  // care of the first, after its own LISTEN.
  subscriber.events.on('connected', () => {
    if (!listening || stopped) return;
    connected = true;
    events.emit('listener', { connected: true });
    log.info('listener.connected', `listening on ${channel} again`, {
      channel,
      reconnected: true,
      downMs: Math.round(performance.now() - disconnectedAt),
    });
    onConnected(true);
  });

  return {
    get connected() {
      return connected && !stopped;
    },
    async start() {
      try {
        await subscriber.connect();
        await subscriber.listenTo(channel);
      } catch (error) {
        // close() also stops pg-listen's own reconnect loop, which a failed first connect
        // may already have started.
        await subscriber.close().catch(() => undefined);
        throw error;
      }
      listening = true;
      connected = true;
      events.emit('listener', { connected: true });
      log.info('listener.connected', `listening on ${channel}`, { channel, reconnected: false });
      onConnected(false);
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      connected = false;
      events.emit('listener', { connected: false });
      // UNLISTEN before anything else stops, so nothing new arrives during the shutdown. On a
      // dead connection both calls may never answer; the shutdown does not wait for them.
      const close = async () => {
        await subscriber.unlistenAll().catch(() => undefined);
        await subscriber.close().catch(() => undefined);
      };
      await Promise.race([
        close(),
        new Promise((resolve) => setTimeout(resolve, CLOSE_TIMEOUT_MS).unref()),
      ]);
    },
  };
}
