// PURGE_SOURCE=wal: the token tables' changes, decoded from a logical replication slot with
// pgoutput (through pg-logical-replication). The auth service's commits pay nothing for it:
// no trigger runs, and no NOTIFY queue lock is taken at commit; the walsender reads the WAL
// the commits write anyway.
//
// What it sees: every UPDATE that leaves a row revoked (and every INSERT of a row that is
// revoked already), committed, in commit order. A rolled-back revocation is never decoded.
// Each goes to its table's purger as a revocation, whose DELETE re-checks the rule, so a row
// restored since is kept.
//
// What it promises: a position is acknowledged to the server only once every revocation
// before it is settled (Purger.settled: deleted by a committed DELETE, or paid by a catch-up).
// A daemon killed at any moment therefore gets every unsettled revocation again from the slot
// when it comes back: no catch-up scan is needed after a restart. One is needed only when the
// slot is new (made by this daemon because it was missing, or remade because the server gave
// it up: wal_status = 'lost'), since revocations before its creation were never in it.
//
// One consumer at a time: the server lets one walsender stream from a slot. A second daemon
// (a replica) finds the slot active, logs `wal.waiting` once, stands by and tries again every
// few seconds, so it takes over within seconds of the first one going away.
import { setTimeout as delay } from 'node:timers/promises';
import { LogicalReplicationService } from 'pg-logical-replication';
import type { Config } from '../../config.js';
import { listenerConnectionConfig } from '../../db.js';
import { ConfigurationError, StandbyError } from '../../errors.js';
import type { ReaperEvents } from '../../events.js';
import { reconnectDelay } from '../../listener.js';
import { serializeError, type Logger } from '../../logger.js';
import { jittered } from '../../retry.js';
import { markerColumn, recordsRevocationTimes, type TableShape } from '../../schema.js';
import type { CatchUpReason, Purger } from '../purger.js';
import { pgoutputPlugin, type DecodedMessage, type DecodedValues } from './pgoutput.js';
import type { PurgeSource } from './source.js';
import {
  checkReplicaIdentities,
  checkWalPrerequisites,
  createSlot,
  dropSlot,
  publicationExists,
  readSlotState,
  withSlotClient,
} from './wal-slot.js';

/** How often the standby position goes to the server, and the slot's lag is read. */
const STATUS_INTERVAL_MS = 1_000;
const LAG_CHECK_INTERVAL_MS = 10_000;
/** How often a daemon standing by tries the slot again. */
const STANDBY_RETRY_MS = 2_000;
/** A lag warning repeats at most this often while the slot stays past the threshold. */
const LAG_WARNING_REPEAT_MS = 10 * 60_000;
const OBJECT_IN_USE = '55006';

/** Another walsender streams from the slot: this daemon stands by. */
class SlotInUseError extends Error {
  constructor(readonly pid: number | null) {
    super(`the replication slot is in use${pid === null ? '' : ` by process ${pid}`}`);
  }
}

type WalConfig = Pick<Config, 'databaseUrl' | 'listenDatabaseUrl' | 'purge' | 'statementTimeoutMs'>;

/**
 * True when a decoded row should reach the purger: revoked now, or, while revocation times are
 * recorded, any change of the marker (an un-revoke must forget its time). The row's values are
 * the server's text: a boolean is "t" or "f".
 */
export function isRevocationChange(
  shape: TableShape,
  row: DecodedValues,
  kind: 'insert' | 'update',
): boolean {
  const marker = shape.marker;
  if (marker === null) return false;
  if (marker.kind === 'time') {
    const value = row[marker.time.column];
    return value !== null && value !== undefined;
  }
  if (kind === 'update' && recordsRevocationTimes(shape)) return true;
  return row[marker.column] === (marker.dead ? 't' : 'f');
}

/** An LSN, "16/B374D848", as a number. */
function parseLsn(lsn: string): bigint {
  const [high, low] = lsn.split('/');
  return (BigInt(`0x${high}`) << 32n) | BigInt(`0x${low}`);
}

function formatLsn(lsn: bigint): string {
  return `${(lsn >> 32n).toString(16).toUpperCase()}/${(lsn & 0xffffffffn).toString(16).toUpperCase()}`;
}

export function createWalSource({
  config,
  logger,
  purgers,
  events,
}: {
  config: WalConfig;
  logger: Logger;
  purgers: readonly Purger[];
  events: ReaperEvents;
}): PurgeSource {
  const log = logger.child('wal');
  const slot = config.purge.walSlot;
  const byTable = new Map<string, Purger>();
  for (const purger of purgers) for (const table of purger.tables) byTable.set(table, purger);

  let stopped = false;
  let streaming = false;
  /** Standing by while another daemon streams from the slot. */
  let standingBy = false;
  let standby = false;
  let disconnectedAt = performance.now();
  let service: LogicalReplicationService | null = null;
  let running: Promise<void> | null = null;
  const stopping = new AbortController();
  /** False until the first connect: the first one owes a catch-up (see owedCatchUp). */
  let startedOnce = false;

  /**
   * The newest position all of whose revocations have reached the purgers: the end of the
   * last commit decoded, or a keepalive's position between transactions.
   */
  let decoded: bigint | null = null;
  /**
   * The newest position whose revocations are all settled: what the server may forget. It
   * starts at the slot's confirmed_flush_lsn, so that a reply is possible at once.
   */
  let confirmed: bigint | null = null;
  /**
   * The transaction being decoded, with its commit time for the latency figure (as ISO text
   * once a revocation needs it); null between.
   */
  let transaction: { commitTimeMs: number; committedAt: string | null } | null = null;
  let advancing = false;
  /**
   * The catch-up this process owes, once the stream has settled past `after` (the WAL's end
   * when it was owed): one at every start, as the safety net for what a crash left handed to
   * a catch-up that never ran, and one after each new slot, for what came before it. By then
   * the stream has deleted what the slot holds, so the catch-up finds only what it could not.
   */
  let owedCatchUp: { reason: CatchUpReason; after: bigint } | null = null;

  const later = (a: bigint | null, b: bigint) => (a === null || b > a ? b : a);

  /** Tells the server the settled position (it must hear from us within wal_sender_timeout). */
  const respond = () => {
    if (service !== null && confirmed !== null && streaming) {
      // The library sends its argument + 1 ("the last byte received, + 1"), but a commit's
      // end is already one past its last byte: sending end + 1 would tell the server a
      // transaction whose commit record starts right there was handled, and it would skip it.
      void service.acknowledge(formatLsn(confirmed - 1n)).catch(() => undefined);
    }
  };

  /**
   * Moves the settled position up to what was decoded by now, once the purgers have settled
   * everything received before this call; one check at a time, so memory stays flat however
   * many commits arrive meanwhile.
   */
  const advance = async () => {
    if (advancing || decoded === null) return;
    advancing = true;
    const candidate = decoded;
    try {
      const settled = await Promise.all(purgers.map((purger) => purger.settled()));
      // A purger that stopped first handled nothing more: those positions are decoded again.
      if (settled.every(Boolean) && !stopped) confirmed = later(confirmed, candidate);
    } finally {
      advancing = false;
    }
    respond();
    if (owedCatchUp !== null && confirmed !== null && confirmed >= owedCatchUp.after) {
      const { reason } = owedCatchUp;
      owedCatchUp = null;
      for (const purger of purgers) void purger.catchUp(reason);
    }
  };

  /** What the decoder reads of a table's changes: its id and its marker, and no other column. */
  const columnsToRead = (table: string) => {
    const shape = byTable.get(table)?.shape;
    if (shape?.marker === null || shape?.marker === undefined || shape.id === null) return null;
    return [shape.id.column, markerColumn(shape.marker)];
  };

  const onData = (_lsn: string, message: DecodedMessage) => {
    if (stopped) return;
    switch (message.tag) {
      case 'begin':
        transaction = { commitTimeMs: message.commitTimeMs, committedAt: null };
        return;
      case 'insert':
      case 'update': {
        const { table, values } = message;
        const purger = byTable.get(table);
        if (purger === undefined || transaction === null) return;
        if (!isRevocationChange(purger.shape, values, message.tag)) return;
        transaction.committedAt ??= new Date(transaction.commitTimeMs).toISOString();
        const problem = purger.receive({
          table,
          id: values[purger.shape.id!.column],
          revoked_at: transaction.committedAt,
        });
        // A decoded value that the purger cannot use: its catch-up finds the row instead.
        if (problem !== null) {
          log.warn('wal.bad_change', `a decoded change was not usable: ${problem}`, { table });
          purger.catchUpSoon('bad_payload');
        }
        return;
      }
      case 'commit':
        transaction = null;
        if (message.endLsn > 0n) decoded = later(decoded, message.endLsn);
        return;
      default:
        return;
    }
  };

  // A keepalive's position is the end of the WAL sent so far. With no transaction half
  // received and every commit settled, everything before it is handled: the slot can move
  // on past the auth service's other tables' WAL, which it would otherwise keep.
  const onHeartbeat = (lsn: string, shouldRespond: boolean) => {
    if (transaction === null) decoded = later(decoded, parseLsn(lsn));
    if (shouldRespond) respond();
  };

  /**
   * Checks the server, and makes the slot when it is missing or lost. Returns where the slot
   * resumes, the WAL's end now, and whether the slot is new.
   */
  const prepareSlot = () =>
    withSlotClient(
      config,
      async (client) => {
        const recovery = await client.query<{ standby: boolean }>(
          'SELECT pg_is_in_recovery() AS standby',
        );
        if (recovery.rows[0]?.standby === true) throw new StandbyError();
        const problems = [
          ...(await checkWalPrerequisites(client)),
          ...(await checkReplicaIdentities(
            client,
            purgers.map((purger) => purger.shape.relation),
          )),
        ];
        if (!(await publicationExists(client, slot))) {
          problems.push(
            `PURGE_SOURCE=wal needs the publication ${slot}, and the database has none. Run "token-reaper install" with PURGE_SOURCE=wal.`,
          );
        }
        if (problems.length > 0) throw new ConfigurationError(problems);
        const state = await readSlotState(client, slot);
        if (state.exists && state.active) throw new SlotInUseError(state.activePid);
        const walEnd = async () =>
          parseLsn(
            (await client.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn'))
              .rows[0]!.lsn,
          );
        if (state.exists && !state.lost) {
          return {
            created: false,
            resumesAt: state.confirmedFlushLsn === null ? null : parseLsn(state.confirmedFlushLsn),
            walEnd: await walEnd(),
          };
        }
        if (state.lost) {
          // The server gave the slot up (max_slot_wal_keep_size): what it held is gone, and
          // the slot cannot stream again. A new one, then a catch-up for what was missed.
          await dropSlot(client, slot, { onlyLost: true });
          log.warn(
            'wal.slot_recreated',
            `the replication slot ${slot} was invalidated (it kept more WAL than max_slot_wal_keep_size); made it again, and a catch-up deletes what it missed`,
            { slot },
          );
        } else {
          log.warn(
            'wal.slot_created',
            `the replication slot ${slot} was missing; made it, and a catch-up deletes what was revoked before it`,
            { slot },
          );
        }
        await createSlot(client, slot);
        const made = await readSlotState(client, slot);
        return {
          created: true,
          resumesAt: made.confirmedFlushLsn === null ? null : parseLsn(made.confirmedFlushLsn),
          walEnd: await walEnd(),
        };
      },
      { patient: true },
    );

  let lagWarnedAt = -Infinity;
  const checkLag = async () => {
    try {
      const state = await withSlotClient(config, (client) => readSlotState(client, slot));
      events.emit('walSlot', { slot, retainedBytes: state.retainedBytes, lost: state.lost });
      const threshold = config.purge.walLagWarningBytes;
      if (state.retainedBytes !== null && state.retainedBytes > threshold) {
        if (performance.now() - lagWarnedAt > LAG_WARNING_REPEAT_MS) {
          lagWarnedAt = performance.now();
          log.warn(
            'wal.lag',
            `the replication slot ${slot} keeps ${state.retainedBytes} bytes of WAL, past PURGE_WAL_LAG_WARNING`,
            { slot, retainedBytes: state.retainedBytes, thresholdBytes: threshold },
          );
        }
      } else {
        lagWarnedAt = -Infinity;
      }
    } catch (error) {
      log.debug('wal.lag_check_failed', 'reading the slot’s lag failed', { slot, error });
    }
  };

  /** One session: resolves when it is ready to stream, with the stream's end as `ended`. */
  const connect = async (): Promise<{ ended: Promise<void> }> => {
    const prepared = await prepareSlot();
    if (stopped) throw new Error('stopped');
    // The slot resumes at its confirmed position: what this process decoded past it before
    // comes again. A new slot starts afresh, and positions of the old one mean nothing to it.
    transaction = null;
    decoded = null;
    confirmed = prepared.resumesAt;
    if (prepared.created) {
      owedCatchUp = { reason: 'slot_created', after: prepared.walEnd };
    } else if (!startedOnce) {
      owedCatchUp ??= { reason: 'connected', after: prepared.walEnd };
    }
    startedOnce = true;
    // No query timeout: START_REPLICATION is one query that lasts as long as the stream.
    const replication = new LogicalReplicationService(
      { ...listenerConnectionConfig(config), query_timeout: 0 },
      {
        // Positions go back only through respond(), once settled: never on receipt, and
        // never by the library's own timer, which would acknowledge what is not yet deleted.
        acknowledge: { auto: false, timeoutSeconds: 0 },
      },
    );
    replication.on('data', onData);
    replication.on('heartbeat', (lsn: string, _time: number, shouldRespond: boolean) =>
      onHeartbeat(lsn, shouldRespond),
    );
    let failure: unknown = null;
    replication.on('error', (error: unknown) => {
      failure ??= error;
    });
    const started = new Promise<void>((resolve) => replication.once('start', () => resolve()));
    const plugin = pgoutputPlugin(slot, columnsToRead);
    const ended = replication.subscribe(plugin, slot).then(
      () => {
        if (failure !== null) throw failure;
      },
      (error: unknown) => {
        throw failure ?? error;
      },
    );
    service = replication;
    const first = await Promise.race([started.then(() => 'started'), ended.then(() => 'ended')]);
    // The library takes a connection that ends before streaming starts for a clean end.
    if (first === 'ended') throw new Error('the replication stream ended before it started');
    if (stopped) throw new Error('stopped');
    return { ended: ended.then(() => Promise.reject(new Error('the replication stream ended'))) };
  };

  const closeService = async () => {
    const current = service;
    service = null;
    streaming = false;
    await current?.stop().catch(() => undefined);
  };

  const statusTimer = setInterval(() => void advance(), STATUS_INTERVAL_MS);
  statusTimer.unref();
  const lagTimer = setInterval(() => void checkLag(), LAG_CHECK_INTERVAL_MS);
  lagTimer.unref();

  const pause = (ms: number) =>
    delay(ms, undefined, { ref: false, signal: stopping.signal }).catch(() => undefined);

  const isSlotInUse = (error: unknown) =>
    error instanceof SlotInUseError || serializeError(error).code === OBJECT_IN_USE;

  /** Connects and starts streaming; `ended` is the stream's end, which always rejects. */
  const stream = async (reconnected: boolean) => {
    const session = await connect();
    log.info('wal.connected', `streaming revocations from the replication slot ${slot}`, {
      slot,
      reconnected,
      downMs: reconnected && !standingBy ? Math.round(performance.now() - disconnectedAt) : 0,
    });
    streaming = true;
    standby = false;
    standingBy = false;
    events.emit('listener', { connected: true });
    void checkLag();
    return session;
  };

  const standBy = (error: unknown) => {
    if (!standingBy) {
      log.info(
        'wal.waiting',
        `another daemon streams from the replication slot ${slot}; standing by to take over`,
        { slot, pid: error instanceof SlotInUseError ? error.pid : null },
      );
    }
    standingBy = true;
  };

  /** The first attempt decides start(): standing by is a good start; any other failure is not. */
  const startStreaming = async () => {
    try {
      return await stream(false);
    } catch (error) {
      await closeService();
      if (!isSlotInUse(error)) throw error;
      standBy(error);
      return null;
    }
  };

  /** Streams, or stands by, until stopped; after a loss it reconnects with a growing delay. */
  const keepStreaming = async (first: { ended: Promise<void> } | null) => {
    let ended = first?.ended ?? null;
    let attempt = 0;
    let waitMs = jittered(STANDBY_RETRY_MS);
    while (!stopped) {
      if (ended === null) {
        await pause(waitMs);
      } else {
        // A lost stream is reconnected at once; a failed attempt waits, growing.
        await ended.catch(async (error: unknown) => {
          await closeService();
          if (stopped) return;
          disconnectedAt = performance.now();
          events.emit('listener', { connected: false });
          log.warn('wal.disconnected', 'the replication stream ended; reconnecting', {
            slot,
            error: serializeError(error),
          });
        });
      }
      ended = null;
      if (stopped) return;
      try {
        ended = (await stream(true)).ended;
        attempt = 0;
      } catch (error) {
        await closeService();
        if (stopped) return;
        if (isSlotInUse(error)) {
          standBy(error);
          waitMs = jittered(STANDBY_RETRY_MS);
          continue;
        }
        if (standingBy) {
          standingBy = false;
          disconnectedAt = performance.now();
          events.emit('listener', { connected: false });
        }
        if (error instanceof StandbyError && !standby) {
          standby = true;
          log.warn('database.standby', 'the database is a standby; waiting for a primary', {
            slot,
          });
        }
        attempt += 1;
        // Every failure says why: a dropped publication, a rotated password, a standby.
        log.warn('wal.reconnecting', `reconnecting failed, attempt ${attempt}`, {
          slot,
          attempt,
          downMs: Math.round(performance.now() - disconnectedAt),
          error: serializeError(error),
        });
        waitMs = reconnectDelay(attempt - 1);
      }
    }
  };

  return {
    name: 'wal',
    async start() {
      running = keepStreaming(await startStreaming());
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      stopping.abort();
      clearInterval(statusTimer);
      clearInterval(lagTimer);
      // The last settled position goes back before the connection closes, so a restart does
      // not decode again what this run already deleted.
      respond();
      await closeService();
      await running;
      // A connect that was under way when stop() came has closed by now; this is in case.
      await closeService();
    },
    get connected() {
      return !stopped && (streaming || standingBy);
    },
    get standby() {
      return standby && !stopped;
    },
    downForMs: () =>
      stopped || streaming || standingBy ? 0 : Math.round(performance.now() - disconnectedAt),
  };
}
