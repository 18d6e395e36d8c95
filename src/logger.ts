// Winston, writing one JSON object per line to stdout. Every line carries `timestamp`,
// `level`, `message` and `event`; the event is the stable name operators alert on, the
// message is for people. Components log through child loggers that add `component`.
import type { Writable } from 'node:stream';
import winston from 'winston';
import type { LogLevel } from './config.js';
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

export interface LoggerOptions {
  level: LogLevel;
  /** Defaults to process.stdout. */
  stream?: Writable;
}

export function createLogger(options: LoggerOptions): Logger {
  const winstonLogger = winston.createLogger({
    level: options.level,
    format: winston.format.combine(
      winston.format.timestamp(),
      winston.format((info) => Object.assign(info, redactSecrets({ ...info })))(),
      winston.format.json(),
    ),
    transports: [new winston.transports.Stream({ stream: options.stream ?? process.stdout })],
  });
  const flush = () =>
    new Promise<void>((resolve) => {
      winstonLogger.on('finish', () => resolve());
      winstonLogger.end();
    });
  return wrap(winstonLogger, flush);
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
