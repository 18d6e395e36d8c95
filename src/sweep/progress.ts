// Progress of a long sweep: pages walked out of the pages to walk, rows deleted, the rate and
// an ETA. It emits a `progress` event every second (the CLI draws its terminal line from
// those) and logs `sweep.progress` every fifth one, so a log shipper sees a line every 5 s.
import type { ReaperEvents, SweepProgressEvent } from '../events.js';
import type { Logger } from '../logger.js';

export const PROGRESS_EVENT_INTERVAL_MS = 1_000;
const EVENTS_PER_LOG_LINE = 5;

export interface ProgressTracker {
  /** More pages to walk (a table, or one more partition). */
  addPages(pages: number): void;
  /** A batch finished. */
  batch(pages: number, rows: number): void;
  stop(): void;
}

export function trackProgress(
  table: string,
  logger: Logger,
  events: ReaperEvents,
  throttledBy: () => SweepProgressEvent['throttled'],
): ProgressTracker {
  const started = performance.now();
  let pagesTotal = 0;
  let pagesDone = 0;
  let deleted = 0;
  let ticks = 0;
  const timer = setInterval(() => {
    ticks += 1;
    const seconds = (performance.now() - started) / 1000;
    const pagesPerSecond = pagesDone / seconds;
    const progress: SweepProgressEvent = {
      table,
      pagesDone,
      pagesTotal,
      deleted,
      rowsPerSecond: Math.round(deleted / seconds),
      etaSeconds: pagesPerSecond > 0 ? Math.round((pagesTotal - pagesDone) / pagesPerSecond) : null,
      throttled: throttledBy(),
    };
    events.emit('progress', progress);
    if (ticks % EVENTS_PER_LOG_LINE === 0) {
      logger.info(
        'sweep.progress',
        `${table}: ${pagesDone} of ${pagesTotal} pages, ${deleted} rows deleted` +
          (progress.throttled ? ` (paused for ${progress.throttled.source})` : ''),
        { ...progress },
      );
    }
  }, PROGRESS_EVENT_INTERVAL_MS);
  timer.unref();
  return {
    addPages: (pages) => {
      pagesTotal += pages;
    },
    batch: (pages, rows) => {
      pagesDone += pages;
      deleted += rows;
    },
    stop: () => clearInterval(timer),
  };
}
