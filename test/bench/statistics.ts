// The few statistics the benchmark reports. Percentiles use the nearest-rank method: the value
// reported is one that was really observed, never an interpolation between two of them.

/** The nearest-rank percentile (0 < fraction <= 1) of `values`, or null when there are none. */
export function percentile(values: readonly number[], fraction: number): number | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((left, right) => left - right);
  const rank = Math.max(1, Math.ceil(fraction * sorted.length));
  return sorted[rank - 1]!;
}

/** The median; for an even count, the mean of the two middle values. Null when empty. */
export function median(values: readonly number[]): number | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((left, right) => left - right);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** The median of the values that are not null, or null when none is. */
export function medianOf(values: readonly (number | null)[]): number | null {
  return median(values.filter((value): value is number => value !== null));
}

export function maximum(values: readonly number[]): number | null {
  return values.length === 0 ? null : values.reduce((left, right) => Math.max(left, right));
}

/** `numerator / denominator`, or null when either is missing or the denominator is 0. */
export function ratio(numerator: number | null, denominator: number | null): number | null {
  if (numerator === null || denominator === null || denominator === 0) return null;
  return numerator / denominator;
}
