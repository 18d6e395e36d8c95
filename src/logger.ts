// Winston, writing one JSON object per line to stdout. Every line carries `timestamp`,
// `level`, `message` and `event`; the event is the stable name operators alert on, the
// message is for people. Components log through child loggers that add `component`.
// LOG_FORMAT=pretty writes the same entries as short lines for a terminal (pretty.ts), after
// the same redaction.
//
// The stream is never allowed to hold more than a bound: stdout that nobody reads (a pipe to a
// stalled log shipper) would otherwise keep every line in memory. Past the bound, lines are
// dropped and counted, and once the stream drains one `log.dropped` line says how many.
import type { Writable } from 'node:stream';
import winston from 'winston';
import { LOG_LEVELS, type LogFormat, type LogLevel } from './config.js';
import { formatPrettyLine, type StatusLine } from './pretty.js';
import { redactSecrets } from './redact.js';

export type LogFields = Record<string, unknown>;

export interface Logger {
  error(event: string, message: string, fields?: LogFields): void;
  warn(event: string, message: string, fields?: LogFields): void;
  info(event: string, message: string, fields?: LogFields): void;
  debug(event: string, message: string, fields?: LogFields): void;
  /** A logger that adds `component` to every line. */
  child(component: string): Logger;
  /** Writes out everything logged so far; the logger takes no lines after it. */
  flush(): Promise<void>;
}

/**
 * Bytes the stream may hold unwritten before lines are dropped. A line is 200 to 400 bytes, so
 * this is some 3,000 lines: a reader that pauses for a few seconds (a log shipper restarting) or
 * a burst of purge batches loses nothing, while a reader that has stopped for good costs 1 MiB,
 * about 1% of the daemon's measured peak RSS, instead of everything it will ever log.
 */
export const DEFAULT_LOG_BUFFER_LIMIT_BYTES = 1024 * 1024;

export interface LoggerOptions {
  level: LogLevel;
  /** Defaults to process.stdout. */
  stream?: Writable;
  /** Bytes `stream` may hold unwritten before lines are dropped; DEFAULT_LOG_BUFFER_LIMIT_BYTES. */
  bufferLimitBytes?: number;
  /** `json` (the default): one JSON object a line. `pretty`: short lines for people. */
  format?: LogFormat;
  /** ANSI colours in pretty lines (pretty.ts, wantsColors); default none. */
  colors?: boolean;
  /**
   * A line redrawn in place on the same terminal (the sweep's progress bar): taken off the
   * screen before each log line is written, and drawn again after it. The lines of the events
   * it covers are left out while it shows.
   */
  statusLine?: TerminalStatusLine | null;
}

type TerminalStatusLine = Pick<StatusLine, 'suspend' | 'resume' | 'covers'>;

/** Where winston's formats leave the finished line (triple-beam's MESSAGE). */
const MESSAGE = Symbol.for('message');

export function createLogger(options: LoggerOptions): Logger {
  const colors = options.colors ?? false;
  const format = winston.format.combine(
    winston.format.timestamp(),
    // Before either format: what is redacted is redacted in both.
    winston.format((info) => Object.assign(info, redactSecrets({ ...info })))(),
    options.format === 'pretty'
      ? winston.format((info) => {
          info[MESSAGE] = formatPrettyLine(info, { colors });
          return info;
        })()
      : winston.format.json(),
  );
  const winstonLogger = winston.createLogger({
    level: options.level,
    format,
    transports: [
      new BoundedStreamTransport(
        options.stream ?? process.stdout,
        options.bufferLimitBytes ?? DEFAULT_LOG_BUFFER_LIMIT_BYTES,
        format,
        options.statusLine ?? null,
      ),
    ],
  });
  const flush = () =>
    new Promise<void>((resolve) => {
      winstonLogger.on('finish', () => resolve());
      winstonLogger.end();
    });
  return wrap(winstonLogger, flush);
}

/**
 * The methods of a host application's logger that token-reaper writes to: NestJS's `Logger`
 * has them, and so do most others (console, pino and winston through a small adapter).
 */
export interface HostLogger {
  error(message: string): void;
  warn(message: string): void;
  log(message: string): void;
  debug?(message: string): void;
}

/**
 * A logger that hands each entry to the host's logger as one short line, `event message
 * key=value…`, redacted and escaped like a pretty line, without the time and level that the
 * host's logger prints itself. Entries below `level` are left out.
 */
export function createHostLogger(
  host: HostLogger,
  level: LogLevel,
  component: string | null = null,
): Logger {
  const write =
    (entryLevel: 'error' | 'warn' | 'info' | 'debug', send: (line: string) => void) =>
    (event: string, message: string, fields: LogFields = {}) => {
      if (LOG_LEVELS.indexOf(entryLevel) > LOG_LEVELS.indexOf(level)) return;
      const entry = redactSecrets({
        ...serializeErrors(fields),
        level: entryLevel,
        message,
        event,
        ...(component === null ? {} : { component }),
      }) as LogFields;
      send(formatPrettyLine(entry, { colors: false, bare: true }));
    };
  return {
    error: write('error', (line) => host.error(line)),
    warn: write('warn', (line) => host.warn(line)),
    info: write('info', (line) => host.log(line)),
    debug: write('debug', (line) => (host.debug ?? host.log).call(host, line)),
    child: (name) => createHostLogger(host, level, name),
    flush: () => Promise.resolve(),
  };
}

/**
 * Winston's Stream transport, which on its own hands every line to the stream whatever the
 * stream already holds. This one drops a line while the stream holds more than the limit, so
 * the stream never holds more than the limit plus one line. Once dropping starts it goes on
 * until the stream has drained completely, and then the count is the first line written: each
 * gap in the log is one stretch, accounted for where it ends.
 *
 * Error lines are dropped like the rest. A bound that gave way for them would give way in the
 * very flood that matters, a failure logged in a loop, and the memory would be gone all the
 * same; the count, by level, tells the operator that errors were among the lines lost.
 */
class BoundedStreamTransport extends winston.transports.Stream {
  readonly #stream: Writable;
  readonly #limitBytes: number;
  readonly #lineFormat: winston.Logform.Format;
  readonly #statusLine: TerminalStatusLine | null;
  /** Lines dropped since the stream went over the limit, by level; null while writing. */
  #dropped: Record<string, number> | null = null;

  constructor(
    stream: Writable,
    limitBytes: number,
    lineFormat: winston.Logform.Format,
    statusLine: TerminalStatusLine | null,
  ) {
    super({ stream });
    this.#stream = stream;
    // 'drain' comes only after a write was refused, which a stream does at its high-water
    // mark; a limit below that mark would leave the dropping with nothing to end it.
    this.#limitBytes = Math.max(limitBytes, stream.writableHighWaterMark);
    this.#lineFormat = lineFormat;
    this.#statusLine = statusLine;
  }

  override log(info: winston.Logform.TransformableInfo, next: () => void) {
    if (this.#statusLine?.covers(info.event)) return next();
    if (this.#dropped === null && this.#stream.writableLength <= this.#limitBytes) {
      return this.#write(info, next);
    }
    if (this.#dropped === null) {
      this.#dropped = {};
      this.#stream.once('drain', () => this.#reportDropped());
    }
    this.#dropped[info.level] = (this.#dropped[info.level] ?? 0) + 1;
    next();
  }

  // Written straight to the stream rather than logged: it must not be filtered out by the
  // level, and it may come after flush() has ended the logger.
  #reportDropped() {
    const byLevel = this.#dropped ?? {};
    this.#dropped = null;
    const dropped = Object.values(byLevel).reduce((sum, count) => sum + count, 0);
    const line = this.#lineFormat.transform({
      level: 'warn',
      message: `${dropped} log lines dropped while the log stream was not draining`,
      event: 'log.dropped',
      dropped,
      byLevel,
    });
    if (line !== false && line !== true) this.#write(line, () => undefined);
  }

  // The stream transport writes the line before it returns, so the status line is off the
  // screen for exactly that write.
  #write(info: winston.Logform.TransformableInfo, next: () => void) {
    this.#statusLine?.suspend();
    try {
      super.log!(info, next);
    } finally {
      this.#statusLine?.resume();
    }
  }
}

function wrap(target: winston.Logger, flush: () => Promise<void>): Logger {
  const write =
    (level: LogLevel) =>
    (event: string, message: string, fields: LogFields = {}) =>
      target.log(level, message, { ...serializeErrors(fields), event });
  return {
    error: write('error'),
    warn: write('warn'),
    info: write('info'),
    debug: write('debug'),
    child: (component) => wrap(target.child({ component }), flush),
    flush,
  };
}

// Winston logs an Error nested in metadata as `{}`, so errors are turned into plain objects.
function serializeErrors(fields: LogFields): LogFields {
  const result: LogFields = {};
  for (const [key, value] of Object.entries(fields)) {
    result[key] = value instanceof Error ? serializeError(value) : value;
  }
  return result;
}

export interface SerializedError {
  name: string;
  message: string;
  /** The PostgreSQL SQLSTATE or Node's error code, when there is one. */
  code?: string;
}

/**
 * The parts of an error that are safe and useful to log. slonik wraps the driver's error in
 * `cause`, which carries the SQLSTATE and the server's message. `detail` is left out on
 * purpose: for a unique violation it holds the key's value, which may be a token hash.
 */
export function serializeError(error: unknown): SerializedError {
  if (!(error instanceof Error)) return { name: 'Error', message: String(error) };
  const cause = error.cause instanceof Error ? error.cause : undefined;
  const code = codeOf(error) ?? (cause ? codeOf(cause) : undefined);
  const message =
    cause && cause.message && !error.message.includes(cause.message)
      ? `${error.message}: ${cause.message}`
      : error.message;
  return code === undefined ? { name: error.name, message } : { name: error.name, message, code };
}

function codeOf(error: Error): string | undefined {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' ? code : undefined;
}
