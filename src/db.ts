// Every connection the daemon opens is built here, from one description of a database URL
// (describeConnection), so that credentials, TLS and keepalive mean the same for all of them:
// - the pool (slonik) runs the runtime queries: typed templates, escaped identifiers. It may
//   go through a transaction-mode pooler such as PgBouncer, so it relies on no session state
//   and sends no startup parameter a pooler refuses: each statement runs in a transaction of
//   its own that first sets the statement timeout, TimeZone and synchronous_commit with
//   SET LOCAL semantics (see createSettingsDriverFactory);
// - session connections go to LISTEN_DATABASE_URL (by default DATABASE_URL), which must reach
//   PostgreSQL directly or through a session-mode pooler: the listener's LISTEN, the sweep's
//   advisory lock, and the multi-statement SQL of install (a plain pg client, because slonik
//   runs exactly one statement per query).
import { readFileSync } from 'node:fs';
import { setTimeout as delay } from 'node:timers/promises';
import { checkServerIdentity, type ConnectionOptions as TlsOptions } from 'node:tls';
import pg from 'pg';
import {
  BackendTerminatedError,
  BackendTerminatedUnexpectedlyError,
  createDriverFactory,
  createPool,
  IdleTransactionTimeoutError,
  sql,
  StatementCancelledError,
  StatementTimeoutError,
  type CommonQueryMethods,
  type DatabasePool,
  type DriverConfiguration,
  type DriverFactory,
  type DriverQueryResult,
  type DriverTypeParser,
} from 'slonik';
import { z } from 'zod';
import type { Config } from './config.js';
import { StandbyError } from './errors.js';
import { serializeError, type Logger } from './logger.js';

export const APPLICATION_NAME = 'token-reaper';

const CONNECTION_TIMEOUT_MS = 10_000;
const KEEPALIVE_INITIAL_DELAY_MS = 10_000;
/**
 * How long the client waits beyond the statement timeout before it gives up on an answer. A
 * live server cancels a statement at its timeout and says so within milliseconds; only a
 * backend that cannot answer at all (frozen, or behind a half-open connection that keepalive
 * has not yet noticed) reaches this, and its connection is then closed.
 */
export const CLIENT_TIMEOUT_MARGIN_MS = 5_000;
/** How long closing a connection may wait for the server's goodbye before the socket is cut. */
const CLOSE_TIMEOUT_MS = 2_000;

export interface PoolOptions {
  /**
   * Connections the pool may open: the sweep's concurrency, plus one for the purge and the
   * checks (the sweep's lock is on a session connection of its own).
   */
  maximumPoolSize: number;
}

/** The settings the connection functions read; LISTEN_DATABASE_URL defaults to DATABASE_URL. */
export type ConnectionSettings = Pick<Config, 'databaseUrl'> &
  Partial<Pick<Config, 'listenDatabaseUrl'>>;

/** The URL of session connections: LISTEN_DATABASE_URL, else DATABASE_URL. */
export function sessionDatabaseUrl(config: ConnectionSettings): string {
  return config.listenDatabaseUrl ?? config.databaseUrl;
}

export async function createDatabasePool(
  config: Pick<Config, 'databaseUrl' | 'statementTimeoutMs'>,
  logger: Logger,
  options: PoolOptions,
): Promise<DatabasePool> {
  const clients = new Set<pg.Client>();
  const pool = await createPool(config.databaseUrl, {
    driverFactory: createSettingsDriverFactory(config.databaseUrl, clients),
    maximumPoolSize: options.maximumPoolSize,
    // Applied per transaction by the driver, never as startup parameters.
    statementTimeout: config.statementTimeoutMs,
    connectionTimeout: CONNECTION_TIMEOUT_MS,
    // slonik's default runs DISCARD ALL on every release. Nothing the daemon runs leaves
    // session state behind (every setting is local to its transaction), and behind a
    // transaction-mode pooler it would reset whichever server connection it landed on, maybe
    // one whose session another client relies on.
    resetConnection: async () => undefined,
    // Failures are handled by whoever ran the query: a sweep logs and waits for the next
    // run. Retrying here would only hide a database that is going away.
    connectionRetryLimit: 0,
    queryRetryLimit: 0,
    transactionRetryLimit: 0,
  });
  // slonik emits every failed query here as well as throwing it to the caller, who handles
  // it (a sweep logs sweep.failed). The listener must exist, because an EventEmitter with no
  // 'error' listener throws; it only repeats the failure at debug level.
  pool.on('error', (error) => {
    logger.debug('database.query_failed', 'a database query failed', { error });
  });
  // The first connection now, as slonik's own driver makes one: a database that cannot be
  // reached (or a certificate refused) fails here, before any work starts. Later, slonik 47
  // leaves a request that queued for a connection waiting for good when the one being
  // opened fails, and install's first two requests would be that.
  try {
    await pool.connect(async () => undefined);
  } catch (error) {
    await pool.end().catch(() => undefined);
    throw error;
  }
  poolClients.set(pool, clients);
  return pool;
}

/**
 * A plain pg client on a session connection, for multi-statement SQL and install's session
 * advisory lock; the caller connects and ends it. No client-side timeout: install builds
 * indexes CONCURRENTLY, which may take long on a big table.
 */
export function createPlainClient(config: ConnectionSettings, logger: Logger): pg.Client {
  const client = new ExplainedClient(
    describeConnection(sessionDatabaseUrl(config), APPLICATION_NAME),
  );
  client.on('error', (error) => {
    logger.warn('database.connection_lost', 'a database connection was lost', { error });
  });
  return client;
}

/**
 * A connected session on LISTEN_DATABASE_URL, for what must stay on one server session (the
 * sweep's advisory lock); the caller ends it. Its statements have the statement timeout and
 * TimeZone UTC (set for the session: a session connection keeps them) and a client-side
 * timeout beyond it; TCP keepalive notices a peer that vanished.
 */
export async function createSessionClient(
  config: ConnectionSettings & Pick<Config, 'statementTimeoutMs'>,
  logger: Logger,
  applicationName = `${APPLICATION_NAME}-session`,
): Promise<pg.Client> {
  const client = new ExplainedClient(
    describeConnection(sessionDatabaseUrl(config), applicationName),
    { query_timeout: clientTimeoutMs(config.statementTimeoutMs) },
  );
  client.on('error', (error) => {
    logger.warn('database.connection_lost', 'a database connection was lost', { error });
  });
  await client.connect();
  try {
    await client.query(
      "SELECT set_config('statement_timeout', $1, false), set_config('TimeZone', 'UTC', false)",
      [String(config.statementTimeoutMs)],
    );
  } catch (error) {
    await closeClient(client);
    throw error;
  }
  return client;
}

/** The live connections of each pool createDatabasePool made, for cancelStatements. */
const poolClients = new WeakMap<DatabasePool, ReadonlySet<pg.Client>>();

/**
 * Cancels whatever the pool's connections are running, the way libpq's PQcancel does: a
 * CancelRequest with the backend's key, on a connection of its own. A shutdown uses it at its
 * deadline, so that a statement stuck behind a lock is cancelled, not abandoned (an abandoned
 * one would go on waiting in the server, holding its place in the lock queue). A pooler such
 * as PgBouncer forwards the request to the right server connection; pg_cancel_backend() would
 * need the server's pid, which a pooler hides. A cancel that finds the backend idle does
 * nothing.
 */
export async function cancelStatements(pool: DatabasePool): Promise<number> {
  const clients = [...(poolClients.get(pool) ?? [])];
  await Promise.all(clients.map(sendCancelRequest));
  return clients.length;
}

function sendCancelRequest(client: pg.Client): Promise<void> {
  const { host, port, processID, secretKey } = client as unknown as {
    host: string;
    port: number;
    processID: number | null;
    secretKey: number | null;
  };
  if (processID === null || secretKey === null) return Promise.resolve();
  return new Promise((resolve) => {
    // Typed without the two methods a cancel needs; both are pg's own (Client#cancel uses them).
    const connection = new pg.Connection() as pg.Connection & {
      connect(portOrPath: number | string, host?: string): void;
      cancel(processID: number, secretKey: number): void;
    };
    const done = () => {
      connection.stream.destroy();
      resolve();
    };
    // The server answers a CancelRequest by closing the connection; it is sent before any
    // TLS negotiation, as libpq sends it, and needs no authentication.
    connection.on('connect', () => connection.cancel(processID, secretKey));
    connection.on('end', done);
    connection.on('error', done);
    setTimeout(done, CLOSE_TIMEOUT_MS).unref();
    if (host.startsWith('/')) connection.connect(`${host}/.s.PGSQL.${port}`);
    else connection.connect(port, host);
  });
}

/** A session advisory lock held on a session connection of its own; release() ends both. */
export interface SessionLock {
  release(): Promise<void>;
}

/**
 * Takes a session advisory lock, if free, on a session of its own on LISTEN_DATABASE_URL: a
 * session lock taken through a transaction-mode pooler would stay on whichever server
 * connection the pooler picked, held for nobody (and make every later sweep think another is
 * running). Null when someone else holds it. A crashed holder releases it with its connection.
 */
export async function trySessionLock(
  config: ConnectionSettings & Pick<Config, 'statementTimeoutMs'>,
  logger: Logger,
  lock: { classId: number; objectId: number },
  applicationName: string,
): Promise<SessionLock | null> {
  const client = await createSessionClient(config, logger, applicationName);
  try {
    const result = await client.query<{ locked: boolean }>(
      'SELECT pg_try_advisory_lock($1, $2) AS locked',
      [lock.classId, lock.objectId],
    );
    if (result.rows[0]?.locked !== true) {
      await closeClient(client);
      return null;
    }
  } catch (error) {
    await closeClient(client);
    throw error;
  }
  // Ending the session releases the lock; if the connection is gone, so is the lock.
  return { release: () => closeClient(client) };
}

/**
 * The listener's own connection, on LISTEN_DATABASE_URL: LISTEN needs a session, which a
 * transaction-mode pooler does not keep. A query timeout bounds the heartbeat, which would
 * otherwise wait forever on a half-open connection; TCP keepalive notices a peer that vanished.
 * Its application_name tells it apart in pg_stat_activity.
 */
export function listenerConnectionConfig(config: ConnectionSettings): pg.ClientConfig {
  return {
    ...describeConnection(sessionDatabaseUrl(config), `${APPLICATION_NAME}-listener`).options,
    query_timeout: 5_000,
  };
}

/** The client-side timeout for a statement that has `statementTimeoutMs` on the server. */
export function clientTimeoutMs(statementTimeoutMs: number): number {
  return statementTimeoutMs + CLIENT_TIMEOUT_MARGIN_MS;
}

// ---------------------------------------------------------------------------------------------
// The URL

/** A database URL token-reaper cannot use; the message names the part and never its value. */
export class ConnectionUrlError extends Error {
  override readonly name = 'ConnectionUrlError';
}

const SSL_MODES = ['disable', 'no-verify', 'require', 'verify-ca', 'verify-full'] as const;
type SslMode = (typeof SSL_MODES)[number];

/** libpq's names, with libpq's meaning; anything else in the query is refused. */
const URL_PARAMETERS = [
  'host',
  'port',
  'user',
  'password',
  'dbname',
  'application_name',
  'options',
  'sslmode',
  'sslrootcert',
  'sslcert',
  'sslkey',
  'sslpassword',
] as const;

export const SUPPORTED_URL_PARAMETERS = `${URL_PARAMETERS.join(', ')}; sslmode=${SSL_MODES.join('|')}`;

interface ConnectionDescription {
  readonly options: pg.ClientConfig;
  readonly sslMode: SslMode;
  /** The sslrootcert file, `system`, or null. */
  readonly sslRootCert: string | null;
}

/**
 * Checks a URL the way every connection will read it; throws ConnectionUrlError. config.ts
 * calls it so that a bad URL is a configuration error at startup, not a failure later.
 */
export function checkConnectionUrl(url: string): void {
  describeConnection(url, APPLICATION_NAME);
}

/**
 * pg options from a postgres:// URL. slonik's own parser dropped `?password=` and
 * `?sslpassword=`, accepted no verify-ca or verify-full and ignored sslrootcert, so the pool,
 * the listener and install could each read the same URL differently; now they share this.
 * The files are read here, for every new connection, so a renewed certificate is picked up.
 */
function describeConnection(url: string, defaultApplicationName: string): ConnectionDescription {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new ConnectionUrlError('it is not a valid URL');
  }
  const parameters = parsed.searchParams;
  for (const name of new Set(parameters.keys())) {
    if (!(URL_PARAMETERS as readonly string[]).includes(name)) {
      throw new ConnectionUrlError(`the parameter ${JSON.stringify(name)} is not supported`);
    }
  }
  const hostname = decode(parsed.hostname, 'host').replace(/^\[(.*)\]$/, '$1');
  const host = parameters.get('host') ?? (hostname === '' ? undefined : hostname);
  const portText = parameters.get('port') ?? (parsed.port === '' ? undefined : parsed.port);
  const port = portText === undefined ? undefined : Number(portText);
  if (port !== undefined && !(Number.isInteger(port) && port > 0 && port < 65_536)) {
    throw new ConnectionUrlError('the port is not a number from 1 to 65535');
  }
  const user = parameters.get('user') ?? optional(decode(parsed.username, 'user name'));
  const password = parameters.get('password') ?? optional(decode(parsed.password, 'password'));
  const database =
    parameters.get('dbname') ?? optional(decode(parsed.pathname.replace(/^\//, ''), 'database'));
  const options = parameters.get('options');
  const sslMode = readSslMode(parameters.get('sslmode'));
  const sslRootCert = parameters.get('sslrootcert');
  return {
    options: {
      host,
      port,
      user,
      password,
      database,
      application_name: parameters.get('application_name') ?? defaultApplicationName,
      ...(options === null ? {} : { options }),
      ssl: tlsOptions(sslMode, parameters),
      connectionTimeoutMillis: CONNECTION_TIMEOUT_MS,
      keepAlive: true,
      keepAliveInitialDelayMillis: KEEPALIVE_INITIAL_DELAY_MS,
    },
    sslMode,
    sslRootCert,
  };
}

function decode(text: string, part: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new ConnectionUrlError(`the ${part} is not valid percent-encoding`);
  }
}

function optional(text: string): string | undefined {
  return text === '' ? undefined : text;
}

function readSslMode(mode: string | null): SslMode {
  // Without sslmode there is no TLS, as the pool always did. libpq's default, prefer, falls
  // back to a plain connection, which pg cannot do.
  if (mode === null) return 'disable';
  if ((SSL_MODES as readonly string[]).includes(mode)) return mode as SslMode;
  const reason =
    mode === 'allow' || mode === 'prefer'
      ? ': it falls back to an unencrypted connection, which token-reaper does not do; use require or verify-full'
      : '';
  throw new ConnectionUrlError(`sslmode=${JSON.stringify(mode)} is not supported${reason}`);
}

/**
 * TLS as libpq does it, for the modes that verify:
 * - verify-full checks that a certificate authority in sslrootcert signed the server's
 *   certificate, and that the certificate names the host connected to;
 * - verify-ca checks the authority only, so it needs sslrootcert: against the public
 *   authorities, anyone with any certificate from one of them would pass;
 * - sslrootcert=system means the system's authorities (libpq 16), with verify-full only.
 * `require` keeps the meaning the pool gave it, node-postgres's: verified like verify-full,
 * stricter than libpq, which verifies nothing then. `no-verify` encrypts and verifies nothing.
 */
function tlsOptions(mode: SslMode, parameters: URLSearchParams): false | TlsOptions {
  if (mode === 'disable') return false;
  const rootCert = parameters.get('sslrootcert');
  const certFile = parameters.get('sslcert');
  const keyFile = parameters.get('sslkey');
  if ((certFile === null) !== (keyFile === null)) {
    throw new ConnectionUrlError('sslcert and sslkey go together: set both or neither');
  }
  const clientCertificate =
    certFile === null || keyFile === null
      ? {}
      : {
          cert: readTlsFile(certFile, 'sslcert'),
          key: readTlsFile(keyFile, 'sslkey'),
          ...(parameters.has('sslpassword') ? { passphrase: parameters.get('sslpassword')! } : {}),
        };
  if (mode === 'no-verify') return { ...clientCertificate, rejectUnauthorized: false };
  if (mode === 'verify-ca' && (rootCert === null || rootCert === 'system')) {
    throw new ConnectionUrlError(
      'sslmode=verify-ca needs sslrootcert (or PGSSLROOTCERT), the file of the certificate authority that signed the server certificate; with the public authorities use verify-full',
    );
  }
  return {
    ...clientCertificate,
    ...(rootCert === null || rootCert === 'system'
      ? {}
      : { ca: readTlsFile(rootCert, 'sslrootcert') }),
    rejectUnauthorized: true,
    checkServerIdentity:
      mode === 'verify-ca'
        ? () => undefined
        : (host, certificate) => {
            const mismatch = checkServerIdentity(host, certificate) as
              (Error & { reason?: string; code?: string }) | undefined;
            if (mismatch === undefined) return undefined;
            return Object.assign(
              new Error(
                `the server's certificate is not for ${host} (${mismatch.reason}); sslmode=${mode} checks the host name. Connect by a name the certificate lists, or use sslmode=verify-ca to check only the authority that signed it`,
              ),
              { code: mismatch.code },
            );
          },
  };
}

function readTlsFile(path: string, parameter: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (error) {
    throw new ConnectionUrlError(
      `${parameter} names ${path}, which cannot be read (${(error as NodeJS.ErrnoException).code ?? String(error)})`,
    );
  }
}

// What Node reports when no trusted authority vouches for the server's certificate.
const UNTRUSTED_CERTIFICATE = new Set([
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'CERT_SIGNATURE_FAILURE',
  'CERT_UNTRUSTED',
]);

/** A connect failure, with what to change when the server's certificate was not trusted. */
function explainConnectFailure(error: unknown, connection: ConnectionDescription): unknown {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code !== 'string' || !UNTRUSTED_CERTIFICATE.has(code)) return error;
  const authorities =
    connection.sslRootCert === null || connection.sslRootCert === 'system'
      ? "the system's certificate authorities (no sslrootcert)"
      : `the certificate authority in sslrootcert=${connection.sslRootCert}`;
  return Object.assign(
    new Error(
      `the database server's TLS certificate is not signed by ${authorities} (${(error as Error).message}; sslmode=${connection.sslMode}). Set sslrootcert in the URL, or PGSSLROOTCERT, to the file of the authority that signed it`,
      { cause: error },
    ),
    { code },
  );
}

/** A pg client whose connect failure says what to fix. */
class ExplainedClient extends pg.Client {
  constructor(
    private readonly description: ConnectionDescription,
    extra: pg.ClientConfig = {},
  ) {
    super({ ...description.options, ...extra });
  }

  override async connect(): Promise<pg.Client> {
    try {
      return await super.connect();
    } catch (error) {
      throw explainConnectFailure(error, this.description);
    }
  }
}

/**
 * Ends a client, and cuts its socket if the server does not say goodbye in time: a frozen
 * backend never would, and a shutdown must not wait for it.
 */
async function closeClient(client: pg.Client): Promise<void> {
  const ended = client.end();
  const inTime = await Promise.race([
    ended.then(() => true),
    delay(CLOSE_TIMEOUT_MS, false, { ref: false }),
  ]);
  if (!inTime) {
    client.connection.stream.destroy();
    await ended;
  }
}

// ---------------------------------------------------------------------------------------------
// The pool's driver

/**
 * Every pooled statement runs in a transaction that first applies, as SET LOCAL does:
 * - statement_timeout (STATEMENT_TIMEOUT_MS) and slonik's idle-in-transaction timeout, so no
 *   statement waits forever on a lock;
 * - TimeZone=UTC, so that no result depends on the server's or the database's default.
 *   Correctness does not rest on it (targets/time.ts reads every column in its declared zone),
 *   but a timestamptz printed or parsed as text (a partition bound) then means the same on
 *   every server;
 * - synchronous_commit=off: the daemon's deletes commit without waiting for the WAL flush.
 *   Each sweep batch writes a few megabytes of WAL, mostly full-page images, and with
 *   synchronous commit the auth service's own commits queue behind those flushes (the
 *   benchmark measured its p99 at 2.7× its rest during a sweep, 1.9× without). It is safe
 *   here: a delete lost in a crash leaves a dead row, which the next catch-up or sweep deletes
 *   again; nothing the auth service wrote is touched.
 *
 * Startup parameters would be cheaper, but PgBouncer refuses them ("unsupported startup
 * parameter"), and a session SET sticks to whichever server connection a transaction-mode
 * pooler happened to pick. Settings local to a transaction hold on any connection.
 *
 * The three statements (BEGIN and the settings, the statement, COMMIT) are pipelined, in one
 * round trip; if the statement fails, the COMMIT rolls back. Measured on a local PostgreSQL
 * 15, a pool query took 170–200 µs at the median, against 140–190 µs with startup parameters
 * and slonik's DISCARD ALL on every release, which this pool no longer runs. A transaction
 * slonik opens (START TRANSACTION) gets the settings as its first statement, so a SET
 * TRANSACTION must be part of the START TRANSACTION itself; its statements run as they come.
 */
function createSettingsDriverFactory(databaseUrl: string, clients: Set<pg.Client>): DriverFactory {
  return createDriverFactory(async ({ driverConfiguration }) => {
    const settings = transactionSettings(driverConfiguration);
    const statementTimeout = driverConfiguration.statementTimeout;
    const queryTimeoutMs =
      statementTimeout === 'DISABLE_TIMEOUT' ? undefined : clientTimeoutMs(statementTimeout);
    const types = createTypeParsing(driverConfiguration.typeParsers);
    return {
      createPoolClient: async ({ clientEventEmitter }) => {
        const client = new ExplainedClient(describeConnection(databaseUrl, APPLICATION_NAME), {
          types,
          // One round trip per statement; see above.
          pipeline: true,
          ...(queryTimeoutMs === undefined ? {} : { query_timeout: queryTimeoutMs }),
        });
        // Once the client-side timeout has fired, pg cuts the connection, and every failure
        // that follows (the other pipelined queries, the 'error' event, which slonik races
        // against the query) is that timeout.
        let unanswered = false;
        const translate = <E>(error: E) =>
          unanswered ? new DatabaseNotAnsweringError(queryTimeoutMs) : toSlonikError(error);
        const send: Send = (statement) =>
          client.query(statement).catch((error: unknown) => {
            if (error instanceof Error && error.message === QUERY_TIMEOUT_MESSAGE)
              unanswered = true;
            throw error;
          });
        // slonik races each query against this 'error' event; when the event wins, the
        // query's own rejection comes later with no one to handle it, an unhandled rejection
        // that would end the process. So while a query is in flight its failure is the error,
        // and the event is only emitted once the query has settled (slonik then destroys the
        // connection); for an idle connection, at once.
        let inFlight = 0;
        let deferredError: Error | null = null;
        // Nobody listening means slonik has already let the connection go; an 'error' emitted
        // then would be thrown, an uncaught exception, for a connection that no longer matters.
        const emitError = (error: Error) => {
          if (clientEventEmitter.listenerCount('error') > 0) {
            clientEventEmitter.emit('error', translate(error));
          }
        };
        client.on('error', (error) => {
          if (inFlight > 0) deferredError ??= error;
          else emitError(error);
        });
        client.on('notice', (notice) => {
          if (notice.message) clientEventEmitter.emit('notice', { message: notice.message });
        });
        const query = async (text: string, values?: readonly unknown[]) => {
          inFlight += 1;
          try {
            const status = client.getTransactionStatus();
            return toDriverResult(await runWithSettings(send, status, settings, text, values));
          } catch (error) {
            throw translate(error);
          } finally {
            inFlight -= 1;
            const error = deferredError;
            if (inFlight === 0 && error !== null) {
              deferredError = null;
              // After slonik's race has settled and stopped listening.
              setImmediate(() => emitError(error));
            }
          }
        };
        return {
          connect: async () => {
            await client.connect();
            clients.add(client);
            try {
              await types.load((text, values) => query(text, values));
            } catch (error) {
              await closeClient(client);
              throw error;
            }
          },
          end: () => {
            clients.delete(client);
            return closeClient(client);
          },
          query,
          stream: () => {
            throw new Error('token-reaper’s pool does not stream results');
          },
        };
      },
    };
  });
}

/** One statement that sets everything for the transaction it runs in. */
function transactionSettings(configuration: DriverConfiguration): string {
  const settings: [string, string][] = [
    ['synchronous_commit', 'off'],
    ['TimeZone', 'UTC'],
  ];
  const { statementTimeout, idleInTransactionSessionTimeout } = configuration;
  // 0 would mean no timeout to PostgreSQL, so 1 ms, as slonik's own driver does.
  if (statementTimeout !== 'DISABLE_TIMEOUT') {
    settings.push(['statement_timeout', String(Math.max(1, statementTimeout))]);
  }
  if (idleInTransactionSessionTimeout !== 'DISABLE_TIMEOUT') {
    settings.push([
      'idle_in_transaction_session_timeout',
      String(Math.max(1, idleInTransactionSessionTimeout)),
    ]);
  }
  const calls = settings.map(
    ([name, value]) => `set_config(${pg.escapeLiteral(name)}, ${pg.escapeLiteral(value)}, true)`,
  );
  return `SELECT ${calls.join(', ')}`;
}

const TRANSACTION_START = /^\s*(?:START\s+TRANSACTION|BEGIN)\b/i;
const QUERY_TIMEOUT_MESSAGE = 'Query read timeout';

type Send = (statement: string | pg.QueryConfig) => Promise<pg.QueryResult>;

async function runWithSettings(
  send: Send,
  transactionStatus: ReturnType<pg.Client['getTransactionStatus']>,
  settings: string,
  text: string,
  values: readonly unknown[] | undefined,
): Promise<pg.QueryResult> {
  // The extended protocol, as slonik's driver uses: the server refuses a second statement
  // hidden in one.
  const statement: pg.QueryConfig & { queryMode: 'extended' } = {
    text,
    values: values as unknown[] | undefined,
    queryMode: 'extended',
  };
  // Inside a transaction slonik opened, whose start applied the settings.
  if (transactionStatus !== 'I') return send(statement);
  if (TRANSACTION_START.test(text)) {
    const [started, applied] = await Promise.allSettled([send(statement), send(settings)]);
    if (started.status === 'rejected') throw started.reason;
    if (applied.status === 'rejected') {
      // A transaction left open without its settings would run the next statements.
      await send('ROLLBACK').catch(() => undefined);
      throw applied.reason;
    }
    return started.value;
  }
  const [, result] = await inOrder([send(`BEGIN; ${settings}`), send(statement), send('COMMIT')]);
  return result!;
}

/**
 * The results of pipelined queries; rejects with the first failure in pipeline order, the
 * cause of any later one (a statement fails because its transaction failed to start).
 */
async function inOrder<T>(queries: Promise<T>[]): Promise<T[]> {
  const outcomes = await Promise.allSettled(queries);
  const failure = outcomes.find((outcome) => outcome.status === 'rejected');
  if (failure) throw failure.reason;
  return outcomes.map((outcome) => (outcome as PromiseFulfilledResult<T>).value);
}

function toDriverResult(result: pg.QueryResult): DriverQueryResult {
  return {
    command: result.command as DriverQueryResult['command'],
    fields: result.fields.map((field) => ({ dataTypeId: field.dataTypeID, name: field.name })),
    rowCount: result.rowCount,
    rows: result.rows as Record<string, unknown>[],
  };
}

/**
 * slonik's typed errors, as its own driver gives them, for what slonik reacts to (a lost
 * backend: the connection is dropped, not reused) and for timeouts and cancellations, whose
 * log lines then read as before. Any other error stays pg's, with its SQLSTATE.
 */
function toSlonikError<E>(error: E): E | Error {
  if (!(error instanceof Error)) return error;
  if (error.message === 'Connection terminated unexpectedly') {
    return new BackendTerminatedUnexpectedlyError(error);
  }
  const code = (error as { code?: unknown }).code;
  if (error.message === 'Connection terminated' || code === '57P01') {
    return new BackendTerminatedError(error);
  }
  if (code === '25P03') return new IdleTransactionTimeoutError(error);
  if (code === '57014') {
    return error.message.includes('canceling statement due to user request')
      ? new StatementCancelledError(error)
      : new StatementTimeoutError(error);
  }
  return error;
}

/**
 * The client-side timeout fired: the server said nothing for longer than the statement
 * timeout allows. A BackendTerminatedError, so that slonik drops the connection.
 */
class DatabaseNotAnsweringError extends BackendTerminatedError {
  constructor(timeoutMs: number | undefined) {
    const message = `the database did not answer within ${timeoutMs} ms, the statement timeout plus ${CLIENT_TIMEOUT_MARGIN_MS} ms; the connection was closed`;
    super(new Error(message));
    this.name = 'DatabaseNotAnsweringError';
  }
}

const TEXT_ARRAY_OID = 1009;

/**
 * slonik's type parsers (int8 as a bigint, timestamps as milliseconds…) by the types' oids,
 * which the first connection looks up in pg_catalog; arrays of those types too.
 */
function createTypeParsing(typeParsers: readonly DriverTypeParser[]) {
  const parsers = new Map<number, (value: string) => unknown>();
  let loaded: Promise<void> | null = null;
  const textArray = (pg.types.getTypeParser as (oid: number) => (value: string) => unknown)(
    TEXT_ARRAY_OID,
  );
  const mapArray = (value: unknown, parse: (text: string) => unknown): unknown =>
    Array.isArray(value)
      ? value.map((element) => mapArray(element, parse))
      : value === null
        ? null
        : parse(value as string);
  const typeRow = z.object({ oid: z.number(), typarray: z.number(), typname: z.string() });
  return {
    getTypeParser: ((oid: number, format?: 'text' | 'binary') =>
      parsers.get(oid) ?? pg.types.getTypeParser(oid, format)) as typeof pg.types.getTypeParser,
    load(query: (text: string, values: unknown[]) => Promise<DriverQueryResult>) {
      loaded ??= (async () => {
        const names = typeParsers.map((parser) => parser.name);
        const { rows } = await query(
          `SELECT oid::int AS oid, typarray::int AS typarray, typname FROM pg_catalog.pg_type
           WHERE typname = ANY($1::text[]) AND typnamespace = 'pg_catalog'::regnamespace`,
          [names],
        );
        const types = rows.map((row) => typeRow.parse(row));
        for (const parser of typeParsers) {
          const type = types.find((candidate) => candidate.typname === parser.name);
          if (type === undefined) throw new Error(`database type "${parser.name}" not found`);
          parsers.set(type.oid, (value) => parser.parse(value));
          parsers.set(type.typarray, (value) => mapArray(textArray(value), parser.parse));
        }
      })().catch((error: unknown) => {
        loaded = null;
        throw error;
      });
      return loaded;
    },
  };
}

const DEADLOCK_DETECTED = '40P01';
const DEADLOCK_ATTEMPTS = 4;

/**
 * Runs a delete statement again when PostgreSQL picked it as a deadlock victim. The sweep,
 * the purge and the catch-up delete the same rows from different connections, and the
 * purge locks its batch in join order rather than in physical order, so two of them can, rarely,
 * wait on each other. The victim's statement was rolled back whole, so running it again is
 * safe; the re-checked predicate makes it delete only what is still dead.
 */
export async function retryOnDeadlock<T>(statement: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await statement();
    } catch (error) {
      if (attempt === DEADLOCK_ATTEMPTS || serializeError(error).code !== DEADLOCK_DETECTED) {
        throw error;
      }
      await delay(Math.round(20 * attempt * (0.5 + Math.random())));
    }
  }
}

const recoveryRow = z.object({ inRecovery: z.boolean() });

/**
 * Throws StandbyError on a standby. Every command and every description of a target asks
 * first, so that a daemon pointed at a replica, or left on a primary that a failover demoted,
 * says "needs the primary" instead of failing on its first DELETE or LISTEN.
 */
export async function requirePrimary(connection: CommonQueryMethods): Promise<void> {
  const inRecovery = await connection.oneFirst(
    sql.type(recoveryRow)`SELECT pg_is_in_recovery() AS "inRecovery"`,
  );
  if (inRecovery) throw new StandbyError();
}
