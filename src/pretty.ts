// What a person reads on a terminal: LOG_FORMAT=pretty's lines, and the progress bar of a sweep.
//
// A pretty line is the time, the level, the event, the message and the short fields:
//
//   03:00:12.345 INFO  sweep.finished sweep finished: 1200 rows deleted in 840 ms  trigger=cli deleted=1200 durationMs=840
//
// Nested objects are left to the JSON format, which stays the complete record: a field that is
// an object is not shown, an error shows its message, a list of names shows a few of them, null
// and false are left out, and so is a name the message already says. The line has been through the logger's redaction like a JSON line
// (logger.ts), and every control character in it is escaped, so that nothing logged (a table
// name, a notification's payload) can move the cursor or recolour the terminal.

import type { SweepProgressEvent } from './events.js';

export interface PrettyOptions {
  /** ANSI colours: on a terminal, or when FORCE_COLOR asks (wantsColors). */
  colors: boolean;
  /** Without the time and the level, for a host's logger that prints its own (createHostLogger). */
  bare?: boolean;
}

/** Fields every line has, shown in their own places or (component) not at all. */
const PLACED_FIELDS = new Set(['timestamp', 'level', 'message', 'event', 'component']);
/** A string field is cut to this many characters; the JSON format has all of it. */
const LONGEST_VALUE = 80;
/** A list shows at most this many of its items. */
const LIST_ITEMS = 3;

const SGR = {
  bold: [1, 22],
  dim: [2, 22],
  red: [31, 39],
  green: [32, 39],
  yellow: [33, 39],
  blue: [34, 39],
  magenta: [35, 39],
  cyan: [36, 39],
  gray: [90, 39],
} as const;
type Style = keyof typeof SGR;

const LEVEL_STYLES: Record<string, Style> = {
  error: 'red',
  warn: 'yellow',
  info: 'green',
  http: 'magenta',
  verbose: 'cyan',
  debug: 'blue',
  silly: 'gray',
};

// C0 and C1 controls, DEL, and the invisible marks that reorder text (bidi overrides).
const CONTROL = new RegExp(
  String.raw`[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]`,
  'g',
);
const HAS_CONTROL = new RegExp(CONTROL.source);
const NEEDS_QUOTES = /[\s"'=\\]/;
const SHORT_ESCAPES: Record<string, string> = { '\n': '\\n', '\r': '\\r', '\t': '\\t' };

/** One pretty line, without its newline, from a log entry as the logger's format sees it. */
export function formatPrettyLine(info: Record<string, unknown>, options: PrettyOptions): string {
  const paint = (style: Style, text: string) => {
    if (!options.colors) return text;
    const [on, off] = SGR[style];
    return `\x1b[${on}m${text}\x1b[${off}m`;
  };
  const level = String(info.level);
  const message = String(info.message ?? '');
  const parts = [
    ...(options.bare === true
      ? []
      : [
          paint('gray', clock(info.timestamp)),
          paint(LEVEL_STYLES[level] ?? 'bold', level.toUpperCase().padEnd(5)),
        ]),
    paint('cyan', escapeControl(String(info.event ?? '-'))),
    escapeControl(message),
  ];
  const fields: string[] = [];
  for (const [key, value] of Object.entries(info)) {
    if (PLACED_FIELDS.has(key)) continue;
    // A name the message already says (the table, the channel, the slot) is not said twice.
    if (typeof value === 'string' && value.length >= 3 && message.includes(value)) continue;
    const shown = formatValue(value);
    if (shown !== null) fields.push(`${paint('gray', `${escapeControl(key)}=`)}${shown}`);
  }
  const line = parts.join(' ');
  return fields.length === 0 ? line : `${line}  ${fields.join(' ')}`;
}

/** HH:MM:SS.mmm in the process's time zone. */
function clock(timestamp: unknown): string {
  const parsed = typeof timestamp === 'string' ? new Date(timestamp) : new Date(NaN);
  const date = Number.isNaN(parsed.getTime()) ? new Date() : parsed;
  const two = (value: number) => String(value).padStart(2, '0');
  return `${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}.${String(date.getMilliseconds()).padStart(3, '0')}`;
}

/** A field's value as shown after `key=`, or null to leave the field out. */
function formatValue(value: unknown): string | null {
  if (value === null || value === undefined || value === false) return null;
  if (typeof value === 'number' || typeof value === 'bigint' || value === true) {
    return String(value);
  }
  if (typeof value === 'string') return quote(value);
  if (Array.isArray(value)) {
    if (value.length === 0 || !value.every(isScalar)) return null;
    const shown = value.slice(0, LIST_ITEMS).map(String);
    const more = value.length - shown.length;
    return quote(`${shown.join(',')}${more > 0 ? `,…+${more}` : ''}`);
  }
  // An error, as the logger serializes one: its message, and its code when it has one.
  if (typeof value === 'object' && typeof (value as { message?: unknown }).message === 'string') {
    const { message, code } = value as { message: string; code?: unknown };
    return quote(typeof code === 'string' ? `${message} (${code})` : message);
  }
  return null;
}

function isScalar(value: unknown): value is string | number | boolean {
  return typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean';
}

/** The value as is when it is one word, else in double quotes; cut to LONGEST_VALUE. */
function quote(value: string): string {
  const cut = value.length > LONGEST_VALUE ? `${value.slice(0, LONGEST_VALUE - 1)}…` : value;
  if (cut !== '' && !NEEDS_QUOTES.test(cut) && !HAS_CONTROL.test(cut)) return cut;
  // JSON.stringify escapes quotes, backslashes and C0 controls; escapeControl the rest.
  return escapeControl(JSON.stringify(cut));
}

function escapeControl(text: string): string {
  return text.replace(
    CONTROL,
    (character) =>
      SHORT_ESCAPES[character] ?? `\\u${character.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
}

/**
 * Whether to colour lines written to a stream that is (or is not) a terminal. FORCE_COLOR
 * decides first, as in Node and most tools (0 or false: no colour); then NO_COLOR, when set
 * and not empty, or TERM=dumb turns colour off; otherwise a terminal gets colour and anything
 * else none. Takes the environment as a parameter: config.ts stays the one module that reads
 * process.env.
 */
export function wantsColors(
  isTTY: boolean,
  environment: Readonly<Record<string, string | undefined>>,
): boolean {
  const force = environment['FORCE_COLOR'];
  if (force !== undefined) return ['', '1', '2', '3', 'true'].includes(force.trim().toLowerCase());
  const noColor = environment['NO_COLOR'];
  if (noColor !== undefined && noColor !== '') return false;
  if (environment['TERM'] === 'dumb') return false;
  return isTTY;
}

const BAR_WIDTH = 20;

/**
 * A sweep's progress as one line:
 * `public.refresh_tokens [#########-----------] 45% of 12000 pages, 3400 rows, 1200 rows/s, ETA 1m 05s`.
 */
export function formatProgressBar(progress: SweepProgressEvent): string {
  const fraction =
    progress.pagesTotal > 0 ? Math.min(1, progress.pagesDone / progress.pagesTotal) : 0;
  const filled = Math.round(fraction * BAR_WIDTH);
  const bar = `[${'#'.repeat(filled)}${'-'.repeat(BAR_WIDTH - filled)}]`;
  // Rounded down, so that 100% means done.
  const percent = `${Math.floor(fraction * 100)}%`.padStart(4);
  const tail = progress.throttled
    ? `, paused for ${progress.throttled.source} (${Math.round(progress.throttled.lagMs)} ms behind)`
    : progress.etaSeconds === null
      ? ''
      : `, ETA ${formatSeconds(progress.etaSeconds)}`;
  return escapeControl(
    `${progress.table} ${bar} ${percent} of ${progress.pagesTotal} pages, ` +
      `${progress.deleted} rows, ${progress.rowsPerSecond} rows/s${tail}`,
  );
}

/** 45s, 3m 05s, 2h 07m. */
export function formatSeconds(seconds: number): string {
  const whole = Math.max(0, Math.round(seconds));
  const two = (value: number) => String(value).padStart(2, '0');
  if (whole < 60) return `${whole}s`;
  if (whole < 3600) return `${Math.floor(whole / 60)}m ${two(whole % 60)}s`;
  return `${Math.floor(whole / 3600)}h ${two(Math.floor((whole % 3600) / 60))}m`;
}

/**
 * One line at the bottom of a terminal, redrawn in place: the sweep's progress bar. The logger
 * takes it off the screen before each log line and puts it back after (LoggerOptions.statusLine),
 * so log lines scroll above it instead of being written into it. Only for a stream that is a
 * terminal, and one that shares its screen with the log stream.
 */
export interface StatusLine {
  /**
   * Draws `text` in place of what the line showed. While it shows, log lines of the events in
   * `covers` are left out: the line says the same, and says it every second.
   */
  show(text: string, covers?: readonly string[]): void;
  /** Whether a log line of this event is left out: the line shows now, and covers it. */
  covers(event: unknown): boolean;
  /** Takes the line off the screen, before something else is written. */
  suspend(): void;
  /** Draws the line again after suspend(). */
  resume(): void;
  /** Takes the line off the screen for good; show() starts a new one. */
  end(): void;
}

export function createStatusLine(stream: NodeJS.WritableStream & { columns?: number }): StatusLine {
  let text: string | null = null;
  let covered: readonly string[] = [];
  let drawn = false;
  // A line longer than the terminal wraps, and `\r` would go back to the start of its last row
  // only; cut to the width instead.
  const fit = (line: string) => {
    // 0 where the terminal does not say (script(1), some CI runners).
    const columns = stream.columns || 80;
    return line.length < columns ? line : `${line.slice(0, Math.max(0, columns - 2))}…`;
  };
  const erase = () => {
    if (drawn) stream.write('\r\x1b[K');
    drawn = false;
  };
  const draw = () => {
    if (text === null) return;
    stream.write(`\r\x1b[K${fit(text)}`);
    drawn = true;
  };
  return {
    show(line, covers = []) {
      text = line;
      covered = covers;
      draw();
    },
    covers: (event) => text !== null && covered.includes(event as string),
    suspend: erase,
    resume() {
      if (!drawn) draw();
    },
    end() {
      erase();
      text = null;
      covered = [];
    },
  };
}
