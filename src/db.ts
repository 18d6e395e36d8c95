// Two kinds of connection. Runtime queries go through a slonik pool: typed templates, escaped
// identifiers, a statement timeout on every connection. Multi-statement SQL (the files under
// sql/) goes through a plain pg client, because slonik runs exactly one statement per query.
import { setTimeout as delay } from 'node:timers/promises';
import pg from 'pg';
import { createPool, type DatabasePool } from 'slonik';
import type { Config } from './config.js';
import { serializeError, type Logger } from './logger.js';

export const APPLICATION_NAME = 'token-reaper';

export interface PoolOptions {
  /** Connections the pool may open; the sweep needs its concurrency plus one for its lock. */
  maximumPoolSize: number;
}

export async function createDatabasePool(
  config: Pick<Config, 'databaseUrl' | 'statementTimeoutMs'>,
  logger: Logger,
  options: PoolOptions,
): Promise<DatabasePool> {
  const pool = await createPool(withSessionSettings(withApplicationName(config.databaseUrl)), {
    maximumPoolSize: options.maximumPoolSize,
    statementTimeout: config.statementTimeoutMs,
    connectionTimeout: 10_000,
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
  return pool;
}

/** A plain pg client for multi-statement SQL; the caller connects and ends it. */
export function createPlainClient(config: Pick<Config, 'databaseUrl'>, logger: Logger) {
  const client = new pg.Client({ connectionString: withApplicationName(config.databaseUrl) });
  client.on('error', (error) => {
    logger.warn('database.connection_lost', 'a database connection was lost', { error });
  });
  return client;
}

/**
 * The listener's own connection. A query timeout bounds the heartbeat, which would otherwise
 * wait forever on a half-open connection; TCP keepalive notices a peer that vanished. Its
 * application_name tells it apart in pg_stat_activity.
 */
export function listenerConnectionConfig(config: Pick<Config, 'databaseUrl'>): pg.ClientConfig {
  return {
    connectionString: withApplicationName(config.databaseUrl, `${APPLICATION_NAME}-listener`),
    query_timeout: 5_000,
    connectionTimeoutMillis: 10_000,
    keepAlive: true,
    keepAliveInitialDelayMillis: 10_000,
  };
}

/**
 * Every pooled connection's TimeZone is UTC, so that no result depends on the server's or the
 * database's default. Correctness does not rest on it (targets/time.ts reads every column in
 * its declared zone), but a timestamptz printed or parsed as text (a partition bound) then
 * means the same on every server.
 *
 * The daemon's deletes commit without waiting for the WAL flush. Each sweep batch writes a few
 * megabytes of WAL, mostly full-page images, and with synchronous commit the auth service's own
 * commits queue behind those flushes (the benchmark measured its p99 at 2.7× its rest during a
 * sweep, 1.9× without). It is safe here: a delete lost in a crash leaves a dead row, which the
 * next catch-up or sweep deletes again; nothing the auth service wrote is touched.
 */
function withSessionSettings(databaseUrl: string) {
  const url = new URL(databaseUrl);
  const options = url.searchParams.get('options');
  url.searchParams.set(
    'options',
    `${options ? `${options} ` : ''}-c synchronous_commit=off -c TimeZone=UTC`,
  );
  return url.toString();
}

function withApplicationName(databaseUrl: string, name = APPLICATION_NAME) {
  const url = new URL(databaseUrl);
  if (!url.searchParams.has('application_name')) url.searchParams.set('application_name', name);
  return url.toString();
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
