// How fast a sweep walks a table: batches sized by time, a pause after each, and the replica
// gate before each (replica-lag.ts).
//
// A batch is sized in heap pages, but what the auth service feels is its duration: the
// locks it holds, the WAL it writes in one go. What a page costs varies tenfold between
// tables (the number of indexes a DELETE must maintain, triggers, how many rows per page are
// dead), so a fixed page count cannot hold a time budget. The pacer measures each batch and
// sizes the next to take about 40% of SWEEP_BATCH_TARGET_MS (AIM_SHARE), so that the slow
// ones stay near the target. A batch slower than the aim shrinks
// the next one at once, in proportion; a faster one grows it at most twofold, through an
// average of the cost per page, so that one quick batch over empty pages does not make a
// huge next batch where the dead rows are. The walk stays a single pass: only the length of
// the next range changes.
//
// A batch also has a cost that does not depend on its size: its round trips, which a server
// in another zone makes long. Blamed on the pages, it would shrink every batch to one page
// and make the sweep no gentler, only endless. So the pacer fits the recent batches to
// `fixed + perPage × pages` (least squares), sizes the pages for what the aim leaves after
// the fixed part, and leaves them at least half the aim when the fixed part takes more.
// The fit needs batches of different sizes. A walk shrunk to one page, with every batch over
// the aim, has none left: whether the page is slow or the fixed cost was misjudged (one noisy
// first batch makes the pages look dear), it would stay at one page for good. So after
// FIT_WINDOW such batches the pacer tries one of two pages (a probe): on a table whose pages
// are slow that costs one batch in FIT_WINDOW + 1 twice as long; on one whose cost is fixed it
// reveals that, and the batches grow again.
// SWEEP_BATCH_TARGET_MS=0 turns sizing off: every batch is SWEEP_BATCH_PAGES.
// The first batch is SWEEP_BATCH_PAGES (100 by default: about 10 ms on a table with five
// indexes), small so that it does not become the slowest of the walk.
//
// After each batch the worker pauses for SWEEP_PAUSE_RATIO times that batch's duration
// (pt-archiver's --sleep-coef): at 20, the default, the sweep holds a connection busy a 21st
// of the time and leaves the rest to the auth service, whatever the table's cost per page.
import { setTimeout as delay } from 'node:timers/promises';

/** The smallest and largest batch, in heap pages (8 KiB each by default). */
export const MIN_BATCH_PAGES = 1;
export const MAX_BATCH_PAGES = 16_384;
/** How much of the newest measurement goes into the average cost per page, when growing. */
const COST_SMOOTHING = 0.5;
/** The most a batch grows over the one before it. */
const MAX_GROWTH = 2;
/**
 * The share of the target the batches aim at. The target is what the slow batches should
 * stay within, not their average: durations of same-sized batches vary (checkpoints' full
 * page writes, the auth service's own load on the CPUs), and aiming at the target itself
 * measured a p99 well over it. The spread is mostly added time rather than a multiple: on
 * the benchmark's five-index table the slowest batch in a hundred took 12–18 ms more than the
 * median, whether that median was 6 or 12 ms. At 0.6 (a median of 12 ms for the default 20)
 * that p99 measured 30–33 ms on one day and 21 ms on another; at a median of 6 ms, 17–21 ms.
 */
export const AIM_SHARE = 0.4;
/** The recent batches the fixed cost is fitted on. */
const FIT_WINDOW = 16;

export interface PacingSettings {
  /** The first batch's size (SWEEP_BATCH_PAGES). */
  startPages: number;
  /** SWEEP_BATCH_TARGET_MS; 0 for batches of startPages pages each. */
  targetMs: number;
  /** SWEEP_PAUSE_RATIO. */
  pauseRatio: number;
}

export interface BatchDurations {
  p50: number;
  p99: number;
  max: number;
}

export interface Pacer {
  /** The pages the next batch should cover. */
  nextPages(): number;
  /**
   * Records a batch of `pages` pages that took `durationMs`, then waits the pause it calls
   * for, or until `signal` aborts.
   */
  finished(pages: number, durationMs: number, signal: AbortSignal): Promise<void>;
  /**
   * Waits the pause a batch of `durationMs` calls for, without sizing from it: for batches
   * not sized in pages (a partition's marked rows).
   */
  pause(durationMs: number, signal: AbortSignal): Promise<void>;
  /** The distribution of the batch durations so far, or null before the first batch. */
  durations(): BatchDurations | null;
}

const clampPages = (pages: number) =>
  Math.min(MAX_BATCH_PAGES, Math.max(MIN_BATCH_PAGES, Math.round(pages)));

/**
 * The part of a batch's duration that does not depend on its size, fitted by least squares on
 * `recent` batches: 0 until their sizes differ enough to tell, and never more than the
 * quickest of them took.
 */
export function fixedCostMs(recent: readonly { pages: number; ms: number }[]): number {
  if (recent.length < 3) return 0;
  const pages = recent.map((batch) => batch.pages);
  if (Math.max(...pages) < 1.5 * Math.min(...pages)) return 0;
  const meanPages = pages.reduce((sum, value) => sum + value, 0) / recent.length;
  const meanMs = recent.reduce((sum, batch) => sum + batch.ms, 0) / recent.length;
  let covariance = 0;
  let variance = 0;
  for (const batch of recent) {
    covariance += (batch.pages - meanPages) * (batch.ms - meanMs);
    variance += (batch.pages - meanPages) ** 2;
  }
  const perPage = Math.max(0, covariance / variance);
  const intercept = meanMs - perPage * meanPages;
  return Math.min(Math.max(0, intercept), ...recent.map((batch) => batch.ms));
}

/** One per table walk: what a page costs is the table's own. */
export function createPacer(settings: PacingSettings): Pacer {
  const sizing = settings.targetMs > 0;
  let pages = sizing ? clampPages(settings.startPages) : settings.startPages;
  let costPerPage: number | null = null;
  let fixedMs = 0;
  const recent: { pages: number; ms: number }[] = [];
  const measured: number[] = [];

  const resize = (batchPages: number, durationMs: number) => {
    recent.push({ pages: batchPages, ms: durationMs });
    if (recent.length > FIT_WINDOW) recent.shift();
    // Kept while the sizes are too alike to fit again: a settled walk must not lose it.
    fixedMs = fixedCostMs(recent) || fixedMs;
    const aimMs = settings.targetMs * AIM_SHARE;
    const budget = Math.max(aimMs - fixedMs, aimMs / 2);
    // A batch shorter than the timer's resolution tells only that pages are cheap.
    const cost = Math.max(durationMs - fixedMs, 0.05 * durationMs, 0.1) / batchPages;
    if (durationMs > aimMs || costPerPage === null) {
      costPerPage = cost;
    } else {
      costPerPage = COST_SMOOTHING * cost + (1 - COST_SMOOTHING) * costPerPage;
    }
    pages = clampPages(Math.min(budget / costPerPage, batchPages * MAX_GROWTH));
    const stuckAtOnePage =
      pages === MIN_BATCH_PAGES &&
      recent.length === FIT_WINDOW &&
      recent.every((batch) => batch.pages === MIN_BATCH_PAGES && batch.ms > aimMs);
    if (stuckAtOnePage) pages = MIN_BATCH_PAGES * MAX_GROWTH;
  };

  const pause = async (durationMs: number, signal: AbortSignal) => {
    const pauseMs = durationMs * settings.pauseRatio;
    if (pauseMs >= 1 && !signal.aborted) {
      await delay(pauseMs, undefined, { signal }).catch(() => undefined);
    }
  };

  return {
    nextPages: () => pages,
    async finished(batchPages, durationMs, signal) {
      measured.push(durationMs);
      if (sizing) resize(batchPages, durationMs);
      await pause(durationMs, signal);
    },
    pause,
    durations: () => distribution(measured),
  };
}

/** p50, p99 and max of `values`, by the nearest-rank method; null when there are none. */
export function distribution(values: readonly number[]): BatchDurations | null {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = (quantile: number) =>
    sorted[Math.min(sorted.length - 1, Math.ceil(quantile * sorted.length) - 1)]!;
  const round = (value: number) => Math.round(value * 10) / 10;
  return { p50: round(rank(0.5)), p99: round(rank(0.99)), max: round(sorted.at(-1)!) };
}
