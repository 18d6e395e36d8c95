// Durations as people write them in a rule: PostgreSQL interval literals of fixed length,
// `60 minutes`, `24 hours`, `7 days`, `1 day 12 hours`, `90s`, `01:30:00`. They are parsed
// here into seconds, and the SQL carries make_interval(secs => n): a rule never puts text of
// its own into a statement. Months and years are refused: their length depends on the date,
// and "keep it a month" read two ways is a token deleted early.

const UNIT_SECONDS: ReadonlyArray<readonly [RegExp, number]> = [
  [/^(ms|msecs?|milliseconds?)$/, 0.001],
  [/^(s|secs?|seconds?)$/, 1],
  [/^(m|mins?|minutes?)$/, 60],
  [/^(h|hrs?|hours?)$/, 3_600],
  [/^(d|days?)$/, 86_400],
  [/^(w|weeks?)$/, 604_800],
];

/** Seconds, or null when `text` is not a fixed-length interval literal. */
export function parseDuration(text: string): number | null {
  const value = text.trim().toLowerCase();
  if (value === '') return null;
  const clock = /^(\d+):([0-5]\d)(?::([0-5]\d(?:\.\d+)?))?$/.exec(value);
  if (clock) return Number(clock[1]) * 3_600 + Number(clock[2]) * 60 + Number(clock[3] ?? 0);
  let seconds = 0;
  let rest = value;
  while (rest !== '') {
    const part = /^(\d+(?:\.\d+)?)\s*([a-z]+)\s*/.exec(rest);
    if (!part) return null;
    const unit = UNIT_SECONDS.find(([pattern]) => pattern.test(part[2]!));
    if (!unit) return null;
    seconds += Number(part[1]) * unit[1];
    rest = rest.slice(part[0].length);
  }
  return seconds;
}

export const DURATION_HELP =
  'Use a fixed-length interval such as "60 minutes", "24 hours", "7 days", "90s" or "01:30:00" (months and years have no fixed length)';
