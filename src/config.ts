// The only module that reads the environment. It validates every variable, collects every
// problem, and reports them together, so an operator fixes a broken deployment in one pass
// instead of one restart per typo. The result is frozen and passed inward from the CLI.
import { userInfo } from 'node:os';
import cron from 'node-cron';
import { readFileSync } from 'node:fs';
import { checkConnectionUrl, ConnectionUrlError, SUPPORTED_URL_PARAMETERS } from './db.js';
import { ConfigurationError } from './errors.js';
import { redactUrl } from './redact.js';
import { readTargetFile } from './targets/config-file.js';
import { DURATION_HELP, parseDuration } from './targets/duration.js';
import { readEnvironmentTargets, TARGET_VARIABLES } from './targets/environment.js';
import type { QualifiedName, TargetRule } from './targets/rule.js';

export type { QualifiedName, TargetRule } from './targets/rule.js';

export const LOG_LEVELS = ['error', 'warn', 'info', 'http', 'verbose', 'debug', 'silly'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** LOG_FORMAT: `pretty`, short coloured lines for a terminal, or `json`, one object a line. */
export const LOG_FORMATS = ['pretty', 'json'] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

export interface PartitionConfig {
  /** What to do with a partition whose every row has expired. */
  readonly expiredAction: 'drop' | 'detach';
  /** lock_timeout for each partition DDL: the longest any auth query waits behind one. */
  readonly lockTimeoutMs: number;
  /** Attempts per partition DDL before it is left for the next sweep. */
  readonly lockAttempts: number;
  /** Days of partitions kept ahead of now(), or null for the longest stored lifetime + 7 days. */
  readonly premakeDays: number | null;
}

export interface SweepConfig {
  /** node-cron expression. */
  readonly schedule: string;
  /** IANA timezone of the schedule, or null for the process's own. */
  readonly timezone: string | null;
  /**
   * Heap pages of the first TID-range batch of each table; later batches are sized from the
   * measured durations to take about batchTargetMs (sweep/pacing.ts).
   */
  readonly batchPages: number;
  /**
   * SWEEP_BATCH_TARGET_MS: how long one batch should take, and so hold its locks; 0 for
   * batches of batchPages pages each.
   */
  readonly batchTargetMs: number;
  /** SWEEP_PAUSE_RATIO: the pause after each batch, as a multiple of that batch's duration. */
  readonly pauseRatio: number;
  /**
   * SWEEP_MAX_REPLICA_LAG: the sweep pauses while a standby or a logical slot's consumer is
   * further behind than this, in milliseconds; null (the default) to not look.
   */
  readonly maxReplicaLagMs: number | null;
  /**
   * SWEEP_MAX_DURATION: a sweep ends after this long, in milliseconds, and the next resumes
   * where it stopped; null (the default) for no limit.
   */
  readonly maxDurationMs: number | null;
  /** Connections deleting disjoint page ranges at once. */
  readonly concurrency: number;
  readonly partitions: PartitionConfig;
}

export interface MetricsConfig {
  /** Prometheus metrics and health probes on this port, or null (the default) for none. */
  readonly port: number | null;
  readonly host: string;
}

export interface Config {
  readonly databaseUrl: string;
  /**
   * LISTEN_DATABASE_URL, else DATABASE_URL: a session connection (direct to PostgreSQL, or
   * through a session-mode pooler) for LISTEN, the sweep's advisory lock and install, for when
   * DATABASE_URL goes through a transaction-mode pooler, which keeps no session.
   */
  readonly listenDatabaseUrl: string;
  readonly notifyChannel: string;
  readonly purge: PurgeConfig;
  /**
   * What to clean: the file's targets (--config or TOKEN_REAPER_CONFIG), else the two default
   * targets the table variables describe (password resets left out with PASSWORD_RESETS_TABLE=none).
   */
  readonly targets: readonly TargetRule[];
  /** The file the targets came from, or null for the environment's. */
  readonly targetsFile: string | null;
  /**
   * NAIVE_TIMESTAMPS_TIMEZONE: the IANA zone in which the auth service writes its timestamp
   * without time zone columns. Never guessed, never the session's: a naive column on a target
   * without a zone of its own is refused while this is null.
   */
  readonly naiveTimestampsTimezone: string | null;
  readonly sweep: SweepConfig;
  readonly metrics: MetricsConfig;
  /** Bounds every statement the daemon runs, so a blocked delete fails instead of hanging. */
  readonly statementTimeoutMs: number;
  /**
   * INSTALL_LOCK_TIMEOUT: how long install waits for locks, for one DDL transaction (retried
   * under a short lock_timeout) or one concurrent index build, before it gives up naming the
   * blockers.
   */
  readonly installLockTimeoutSeconds: number;
  readonly logLevel: LogLevel;
  /** LOG_FORMAT; unset, `pretty` when the logs go to a terminal (LoadOptions.terminal), else `json`. */
  readonly logFormat: LogFormat;
  /** False when NODE_ENV=test: the story's rule, so tests never fire a sweep at 3 am. */
  readonly scheduleEnabled: boolean;
  readonly health: HealthConfig;
}

/** How revocations reach the prompt purge (PURGE_SOURCE); see src/purge/sources/. */
export const PURGE_SOURCES = ['notify', 'wal', 'poll'] as const;
export type PurgeSourceName = (typeof PURGE_SOURCES)[number];

export interface PurgeConfig {
  /**
   * `notify`: the revoke trigger and LISTEN. `wal`: logical decoding of the token tables from a
   * replication slot, with no trigger. `poll`: the catch-up query every pollIntervalMs, with
   * neither.
   */
  readonly source: PurgeSourceName;
  /** PURGE_POLL_INTERVAL_MS: how often `poll` looks for revoked rows. */
  readonly pollIntervalMs: number;
  /** PURGE_WAL_SLOT: the logical replication slot, and the publication of the same name. */
  readonly walSlot: string;
  /** PURGE_WAL_LAG_WARNING: the WAL the slot may retain before `wal.lag` warns, in bytes. */
  readonly walLagWarningBytes: number;
}

export interface HealthConfig {
  /** LISTENER_DOWN_UNHEALTHY_AFTER: /healthz fails once the listener has been down this long. */
  readonly listenerDownUnhealthyAfterSeconds: number;
  /** READINESS_CHECK_INTERVAL: how often the trigger, the rights and read-only are checked. */
  readonly readinessCheckIntervalSeconds: number;
}

export const DEFAULT_SCHEDULE = '0 3 * * *';

type Environment = Readonly<Record<string, string | undefined>>;

// Unquoted identifiers only. Anything else (spaces, quotes, dots inside a name) is far more
// likely a typo than a real table name, and refusing it keeps every name safe to print.
export const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_$]*$/;
export const MAXIMUM_IDENTIFIER_BYTES = 63;

export interface LoadOptions {
  /** --config PATH, which wins over TOKEN_REAPER_CONFIG. */
  configPath?: string;
  /**
   * Whether the logs go to a terminal, which makes `pretty` LOG_FORMAT's default; `json`
   * otherwise. Defaults to whether stdout is a TTY.
   */
  terminal?: boolean;
  /**
   * A targets file's content, `{ "targets": [ … ] }`, given by a host that embeds the reaper
   * (ReaperOptions.targets). It is read like the file and wins over TOKEN_REAPER_CONFIG.
   */
  targets?: unknown;
}

export function loadConfig(environment: Environment, options: LoadOptions = {}): Config {
  const problems: string[] = [];
  const read = (name: string): string | undefined => {
    // A host's settings may hold numbers or booleans (a ConfigService read from YAML).
    const raw: unknown = environment[name];
    const value = raw === undefined || raw === null ? undefined : String(raw).trim();
    return value === '' ? undefined : value;
  };

  const databaseUrl = readDatabaseUrl(read, problems);
  const listenSetting = read('LISTEN_DATABASE_URL');
  const listenDatabaseUrl =
    listenSetting === undefined
      ? databaseUrl
      : readConnectionUrl('LISTEN_DATABASE_URL', listenSetting, read, problems);

  const schedule = read('REFRESH_TOKEN_CLEANUP_CRON') ?? DEFAULT_SCHEDULE;
  const cronCheck = cron.validateDetailed(schedule);
  if (!cronCheck.valid) {
    const details = cronCheck.errors.map((error) => `${error.field}: ${error.message}`).join('; ');
    problems.push(
      `REFRESH_TOKEN_CLEANUP_CRON=${JSON.stringify(schedule)} is not a valid cron expression` +
        (details ? ` (${details})` : '') +
        `. Use five fields, minute hour day-of-month month day-of-week, e.g. "${DEFAULT_SCHEDULE}" for 3 am daily; a sixth leading field means seconds.`,
    );
  }

  const timezone = read('CLEANUP_TIMEZONE') ?? null;
  if (timezone !== null && !isTimezone(timezone)) {
    problems.push(
      `CLEANUP_TIMEZONE=${JSON.stringify(timezone)} is not a known IANA timezone. Use a name such as "UTC" or "Europe/Berlin", or unset it to use the process's timezone.`,
    );
  }

  const notifyChannel = read('REFRESH_TOKEN_NOTIFY_CHANNEL') ?? 'refresh_token_revoked';
  checkIdentifier('REFRESH_TOKEN_NOTIFY_CHANNEL', notifyChannel, problems);

  const purge = readPurgeConfig(read, problems);

  const naiveTimestampsTimezone = read('NAIVE_TIMESTAMPS_TIMEZONE') ?? null;
  if (naiveTimestampsTimezone !== null && !isTimezone(naiveTimestampsTimezone)) {
    problems.push(
      `NAIVE_TIMESTAMPS_TIMEZONE=${JSON.stringify(naiveTimestampsTimezone)} is not a known IANA time zone. Use the zone the auth service writes its timestamp without time zone columns in, usually "UTC".`,
    );
  }
  const targetsFile =
    options.targets === undefined
      ? (options.configPath ?? read('TOKEN_REAPER_CONFIG') ?? null)
      : null;
  const targets =
    options.targets !== undefined
      ? readTargets(
          options.targets,
          { source: 'targets', described: 'the targets option' },
          read,
          problems,
        )
      : targetsFile === null
        ? readEnvironmentTargets({
            read,
            problems,
            parseTableName: (variable, value) => parseTableName(variable, value, problems),
            checkIdentifier: (variable, value) => checkIdentifier(variable, value, problems),
            revokedGraceSeconds: readDuration(read, problems, 'REFRESH_TOKEN_REVOKED_GRACE'),
          })
        : readTargetsFile(targetsFile, read, problems);

  const batchPages = readInteger(read, problems, 'SWEEP_BATCH_PAGES', 100, 1, 1_000_000);
  const concurrency = readInteger(read, problems, 'SWEEP_CONCURRENCY', 1, 1, 64);
  const batchTargetMs = readInteger(
    read,
    problems,
    'SWEEP_BATCH_TARGET_MS',
    DEFAULT_BATCH_TARGET_MS,
    0,
    60_000,
  );
  const pauseRatio = readRatio(read, problems, 'SWEEP_PAUSE_RATIO', DEFAULT_PAUSE_RATIO);
  const maxReplicaLagMs = readOptionalMilliseconds(read, problems, 'SWEEP_MAX_REPLICA_LAG', DAY_MS);
  const maxDurationMs = readOptionalMilliseconds(read, problems, 'SWEEP_MAX_DURATION', 7 * DAY_MS);
  const expiredAction = (read('EXPIRED_PARTITIONS') ?? 'drop').toLowerCase();
  if (expiredAction !== 'drop' && expiredAction !== 'detach') {
    problems.push(
      `EXPIRED_PARTITIONS=${JSON.stringify(expiredAction)} is not drop or detach. Use detach to keep expired partitions as standalone tables.`,
    );
  }
  const partitions: PartitionConfig = {
    expiredAction: expiredAction === 'detach' ? 'detach' : 'drop',
    lockTimeoutMs: readInteger(read, problems, 'PARTITION_LOCK_TIMEOUT_MS', 200, 1, 60_000),
    lockAttempts: readInteger(read, problems, 'PARTITION_LOCK_ATTEMPTS', 5, 1, 100),
    premakeDays:
      read('PARTITION_PREMAKE_DAYS') === undefined
        ? null
        : readInteger(read, problems, 'PARTITION_PREMAKE_DAYS', 30, 1, 3650),
  };
  const metricsPortSetting = read('METRICS_PORT');
  const metrics: MetricsConfig = {
    port:
      metricsPortSetting === undefined
        ? null
        : readInteger(read, problems, 'METRICS_PORT', 9464, 1, 65_535),
    host: read('METRICS_HOST') ?? '0.0.0.0',
  };
  const statementTimeoutMs = readInteger(
    read,
    problems,
    'STATEMENT_TIMEOUT_MS',
    30_000,
    1,
    24 * 60 * 60 * 1000,
  );
  // Outlasts a deploy's migration or a batch job's transaction, and still fails within a CI
  // job's patience, naming the session, when an idle transaction was left open for good.
  const installLockTimeoutSeconds = readPositiveDuration(
    read,
    problems,
    'INSTALL_LOCK_TIMEOUT',
    300,
  );

  const logLevelSetting = (read('LOG_LEVEL') ?? 'info').toLowerCase();
  if (!(LOG_LEVELS as readonly string[]).includes(logLevelSetting)) {
    problems.push(
      `LOG_LEVEL=${JSON.stringify(logLevelSetting)} is not a log level. Use one of ${LOG_LEVELS.join(', ')}.`,
    );
  }

  const terminal = options.terminal ?? process.stdout.isTTY === true;
  const logFormatSetting = (read('LOG_FORMAT') ?? (terminal ? 'pretty' : 'json')).toLowerCase();
  if (!(LOG_FORMATS as readonly string[]).includes(logFormatSetting)) {
    problems.push(
      `LOG_FORMAT=${JSON.stringify(logFormatSetting)} is not a log format. Use pretty or json, or unset it for pretty on a terminal and json otherwise.`,
    );
  }

  const health: HealthConfig = {
    listenerDownUnhealthyAfterSeconds: readPositiveDuration(
      read,
      problems,
      'LISTENER_DOWN_UNHEALTHY_AFTER',
      300,
    ),
    readinessCheckIntervalSeconds: readPositiveDuration(
      read,
      problems,
      'READINESS_CHECK_INTERVAL',
      30,
    ),
  };

  if (problems.length > 0) throw new ConfigurationError(problems);

  return deepFreeze({
    databaseUrl: databaseUrl!,
    listenDatabaseUrl: listenDatabaseUrl!,
    notifyChannel,
    purge,
    targets,
    targetsFile,
    naiveTimestampsTimezone,
    sweep: {
      schedule,
      timezone,
      batchPages,
      batchTargetMs,
      pauseRatio,
      maxReplicaLagMs,
      maxDurationMs,
      concurrency,
      partitions,
    },
    metrics,
    statementTimeoutMs,
    installLockTimeoutSeconds,
    logLevel: logLevelSetting as LogLevel,
    logFormat: logFormatSetting as LogFormat,
    scheduleEnabled: environment.NODE_ENV !== 'test',
    health,
  });
}

export function formatTableName(table: QualifiedName): string {
  return table.schema === null ? table.name : `${table.schema}.${table.name}`;
}

const EXAMPLE_URL = 'postgres://user:password@host:5432/database';

function readDatabaseUrl(
  read: (name: string) => string | undefined,
  problems: string[],
): string | undefined {
  const example = EXAMPLE_URL;
  const explicit = read('DATABASE_URL');
  const url = explicit ?? databaseUrlFromPgVariables(read);
  if (url === undefined) {
    problems.push(
      `DATABASE_URL is not set. Set it to the auth database's primary, e.g. ${example}; the standard PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE variables work as a fallback.`,
    );
    return undefined;
  }
  const source = explicit === undefined ? 'the PG* variables' : 'DATABASE_URL';
  return readConnectionUrl(source, url, read, problems);
}

/**
 * The URL every connection will use, with PGSSLROOTCERT as its sslrootcert when it names none
 * (libpq's rule), or undefined after a problem. Every connection reads the URL with
 * checkConnectionUrl's rules; checking it here turns a failure at the first connect into a
 * configuration error at startup.
 */
function readConnectionUrl(
  source: string,
  url: string,
  read: (name: string) => string | undefined,
  problems: string[],
): string | undefined {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    problems.push(`${source} is not a valid URL. Use the form ${EXAMPLE_URL}.`);
    return undefined;
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') {
    problems.push(
      `${source} must start with postgres:// or postgresql://, not ${parsed.protocol}//. Use the form ${EXAMPLE_URL}.`,
    );
    return undefined;
  }
  let effective = url;
  const rootCertificate = read('PGSSLROOTCERT');
  if (rootCertificate !== undefined && !parsed.searchParams.has('sslrootcert')) {
    parsed.searchParams.set('sslrootcert', rootCertificate);
    effective = parsed.toString();
  }
  try {
    checkConnectionUrl(effective);
  } catch (error) {
    if (!(error instanceof ConnectionUrlError)) throw error;
    problems.push(
      `${source} (${redactUrl(url)}) has a parameter token-reaper cannot use: ${error.message}. Supported parameters: ${SUPPORTED_URL_PARAMETERS}; host may name a socket directory.`,
    );
    return undefined;
  }
  return effective;
}

// psql's fallbacks: a socket directory in PGHOST becomes the `host` query parameter.
function databaseUrlFromPgVariables(read: (name: string) => string | undefined) {
  const host = read('PGHOST');
  const database = read('PGDATABASE');
  const user = read('PGUSER');
  if (host === undefined && database === undefined && user === undefined) return undefined;
  const username = user ?? userInfo().username;
  const url = new URL('postgres://localhost');
  url.username = encodeURIComponent(username);
  const password = read('PGPASSWORD');
  if (password !== undefined) url.password = encodeURIComponent(password);
  if (host?.startsWith('/')) url.searchParams.set('host', host);
  else if (host !== undefined) url.hostname = host;
  const port = read('PGPORT');
  if (port !== undefined) url.port = port;
  url.pathname = `/${encodeURIComponent(database ?? username)}`;
  const sslMode = read('PGSSLMODE');
  if (sslMode !== undefined) url.searchParams.set('sslmode', sslMode);
  return url.toString();
}

function readTargetsFile(
  path: string,
  read: (name: string) => string | undefined,
  problems: string[],
): TargetRule[] {
  let content: unknown;
  try {
    content = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    const reason =
      (error as NodeJS.ErrnoException).code === 'ENOENT'
        ? 'does not exist'
        : error instanceof SyntaxError
          ? `is not valid JSON (${error.message})`
          : `cannot be read (${(error as Error).message})`;
    problems.push(
      `the targets file ${path} ${reason}. Pass the path of a JSON file { "targets": [ … ] } with --config or TOKEN_REAPER_CONFIG.`,
    );
    return [];
  }
  return readTargets(
    content,
    { source: path, described: `a targets file (${path})` },
    read,
    problems,
  );
}

/**
 * A targets file's parsed content. `source` begins every problem in it (the file's path);
 * `described` says in a sentence where the targets came from.
 */
function readTargets(
  content: unknown,
  { source, described }: { source: string; described: string },
  read: (name: string) => string | undefined,
  problems: string[],
): TargetRule[] {
  const conflicting = TARGET_VARIABLES.filter((name) => read(name) !== undefined);
  if (conflicting.length > 0) {
    problems.push(
      `${conflicting.join(', ')} ${conflicting.length === 1 ? 'is' : 'are'} set, and so is ${described}, whose targets are all the targets. Describe the tables there, or unset the variables.`,
    );
  }
  return readTargetFile(
    content,
    {
      source,
      parseTableName: (label, value) =>
        isTableName(value) ? parseTableName(label, value, []) : null,
      isIdentifier: (value) =>
        IDENTIFIER.test(value) && Buffer.byteLength(value) <= MAXIMUM_IDENTIFIER_BYTES,
      isTimezone,
    },
    problems,
  );
}

function isTableName(value: string) {
  const parts = value.split('.');
  return (
    parts.length <= 2 &&
    parts.every(
      (part) => IDENTIFIER.test(part) && Buffer.byteLength(part) <= MAXIMUM_IDENTIFIER_BYTES,
    )
  );
}

function parseTableName(variable: string, value: string, problems: string[]): QualifiedName {
  const parts = value.split('.');
  if (!isTableName(value)) {
    problems.push(
      `${variable}=${JSON.stringify(value)} is not a table name. Use table or schema.table, each part letters, digits, _ or $, not starting with a digit, at most 63 bytes; names are used exactly as written (case-sensitive).`,
    );
  }
  return parts.length === 2
    ? { schema: parts[0]!, name: parts[1]! }
    : { schema: null, name: value };
}

function checkIdentifier(variable: string, value: string, problems: string[]) {
  if (!IDENTIFIER.test(value) || Buffer.byteLength(value) > MAXIMUM_IDENTIFIER_BYTES) {
    problems.push(
      `${variable}=${JSON.stringify(value)} is not a valid name. Use letters, digits, _ or $, not starting with a digit, at most 63 bytes.`,
    );
  }
}

function readInteger(
  read: (name: string) => string | undefined,
  problems: string[],
  variable: string,
  fallback: number,
  minimum: number,
  maximum: number,
): number {
  const value = read(variable);
  if (value === undefined) return fallback;
  const number = Number(value);
  if (!/^\d+$/.test(value) || number < minimum || number > maximum) {
    problems.push(
      `${variable}=${JSON.stringify(value)} is not a whole number from ${minimum} to ${maximum}. Unset it for the default, ${fallback}.`,
    );
    return fallback;
  }
  return number;
}

const DURATION_UNITS: Record<string, number> = { s: 1, m: 60, h: 3_600, d: 86_400 };

/** Seconds from `90`, `90s`, `15m`, `1h` or `7d`; 0 when unset. */
function readDuration(
  read: (name: string) => string | undefined,
  problems: string[],
  variable: string,
): number {
  const value = read(variable);
  if (value === undefined) return 0;
  const match = /^(\d+)([smhd]?)$/.exec(value);
  if (!match) {
    problems.push(
      `${variable}=${JSON.stringify(value)} is not a duration. Use a whole number with an optional unit: 90, 90s, 15m, 1h or 7d.`,
    );
    return 0;
  }
  return Number(match[1]) * DURATION_UNITS[match[2] || 's']!;
}

/** A duration of at least a second, or `fallbackSeconds` when unset. */
function readPositiveDuration(
  read: (name: string) => string | undefined,
  problems: string[],
  variable: string,
  fallbackSeconds: number,
): number {
  if (read(variable) === undefined) return fallbackSeconds;
  const known = problems.length;
  const seconds = readDuration(read, problems, variable);
  if (seconds === 0 && problems.length === known) {
    problems.push(`${variable} must be at least 1s.`);
  }
  return seconds;
}

// Measured (npm run bench -- --only gentle; docs/benchmarks.md, "Gentle sweep"): on a table
// with five indexes, batches whose p99 stays within 20 ms. The operations of the auth service
// that overlap a batch are the slow ones, and about 1 ÷ (1 + ratio) of them do: at 5, enough
// to set the workload's p99 (1.3–1.9× its rest); at 20, few enough that it stayed within
// 1.5×, for a sweep about four times as long.
export const DEFAULT_BATCH_TARGET_MS = 20;
export const DEFAULT_PAUSE_RATIO = 20;

/** A decimal from 0 to 100, or `fallback` when unset. */
function readRatio(
  read: (name: string) => string | undefined,
  problems: string[],
  variable: string,
  fallback: number,
): number {
  const value = read(variable);
  if (value === undefined) return fallback;
  const number = Number(value);
  if (!/^\d+(\.\d+)?$/.test(value) || number > 100) {
    problems.push(
      `${variable}=${JSON.stringify(value)} is not a number from 0 to 100, such as 0.5 or 2. Unset it for the default, ${fallback}.`,
    );
    return fallback;
  }
  return number;
}

const DAY_MS = 86_400_000;

/**
 * Milliseconds from an interval such as `500ms`, `5s` or `1h`, up to `maximumMs`; null when
 * unset. (A timer cannot wait longer than 24.8 days: Node fires it at once instead.)
 */
function readOptionalMilliseconds(
  read: (name: string) => string | undefined,
  problems: string[],
  variable: string,
  maximumMs: number,
): number | null {
  const value = read(variable);
  if (value === undefined) return null;
  const seconds = parseDuration(value);
  if (seconds === null || seconds <= 0 || seconds * 1000 > maximumMs) {
    problems.push(
      `${variable}=${JSON.stringify(value)} is not a positive duration of at most ${maximumMs / DAY_MS} day(s). ${DURATION_HELP}, or unset it for no limit.`,
    );
    return null;
  }
  return Math.round(seconds * 1000);
}

// Measured (npm run bench): a poll every 100 ms costs the auth workload nothing measurable
// and keeps revoke→gone under 125 ms at p99.
export const DEFAULT_POLL_INTERVAL_MS = 100;
const DEFAULT_WAL_LAG_WARNING_BYTES = 1024 ** 3;

function readPurgeConfig(
  read: (name: string) => string | undefined,
  problems: string[],
): PurgeConfig {
  const source = (read('PURGE_SOURCE') ?? 'notify').toLowerCase();
  if (!(PURGE_SOURCES as readonly string[]).includes(source)) {
    problems.push(
      `PURGE_SOURCE=${JSON.stringify(source)} is not a purge source. Use notify (the revoke trigger and LISTEN), wal (logical decoding; no trigger, costs the auth service's commits nothing) or poll (no trigger and no slot; works through any pooler).`,
    );
  }
  const walSlot = read('PURGE_WAL_SLOT') ?? 'token_reaper';
  // A slot name is lower case letters, digits and underscores (PostgreSQL's own rule).
  if (!/^[a-z0-9_]{1,63}$/.test(walSlot)) {
    problems.push(
      `PURGE_WAL_SLOT=${JSON.stringify(walSlot)} is not a replication slot name. Use lower case letters, digits and underscores, at most 63, e.g. token_reaper.`,
    );
  }
  return {
    source: (PURGE_SOURCES as readonly string[]).includes(source)
      ? (source as PurgeSourceName)
      : 'notify',
    pollIntervalMs: readInteger(
      read,
      problems,
      'PURGE_POLL_INTERVAL_MS',
      DEFAULT_POLL_INTERVAL_MS,
      10,
      3_600_000,
    ),
    walSlot,
    walLagWarningBytes: readByteSize(
      read,
      problems,
      'PURGE_WAL_LAG_WARNING',
      DEFAULT_WAL_LAG_WARNING_BYTES,
    ),
  };
}

const BYTE_UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  kb: 1024,
  mb: 1024 ** 2,
  gb: 1024 ** 3,
  tb: 1024 ** 4,
};

/** Bytes from `1048576`, `512MB` or `1GB` (PostgreSQL's units, 1024-based). */
function readByteSize(
  read: (name: string) => string | undefined,
  problems: string[],
  variable: string,
  fallback: number,
): number {
  const value = read(variable);
  if (value === undefined) return fallback;
  const match = /^(\d+)\s*([kmgt]?b)?$/i.exec(value);
  const bytes = match ? Number(match[1]) * BYTE_UNITS[(match[2] ?? '').toLowerCase()]! : 0;
  if (!match || bytes < 1 || !Number.isSafeInteger(bytes)) {
    problems.push(
      `${variable}=${JSON.stringify(value)} is not a size. Use a whole number of bytes, or one with a unit: 512MB, 1GB.`,
    );
    return fallback;
  }
  return bytes;
}

function isTimezone(name: string) {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: name });
    return true;
  } catch {
    return false;
  }
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === 'object') {
    for (const member of Object.values(value)) deepFreeze(member);
    Object.freeze(value);
  }
  return value;
}
