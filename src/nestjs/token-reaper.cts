// The injectable reaper of a NestJS app. It starts on application bootstrap and stops on
// shutdown, and it never takes the app down: a problem at start (a bad setting, a missing
// table, a database that does not answer) is logged as an error and reported by the health
// indicator while the app keeps serving, and start is tried again later, except for a bad
// setting, which only a new deployment changes. `failFast: true` rethrows it instead.
//
// This file is CommonJS, like the Nest apps that load it, and it requires the ES module core
// at bootstrap rather than when it is itself required. Node requires ES modules from 20.19
// and 22.12 on, but Jest's own module loader only from Node 24.9 on: loaded late, the core's
// failure to load in an older Jest is a failed start like any other, and every spec that
// imports an app's modules still runs.
import { Logger, type OnApplicationBootstrap, type OnApplicationShutdown } from '@nestjs/common';
import type { ModuleRef } from '@nestjs/core';
import type { SchedulerRegistry } from '@nestjs/schedule';
import { createRequire } from 'node:module';
import type * as Core from '../index.js';
import { DEFAULT_CRON_JOB_NAME, type TokenReaperModuleOptions } from './options.cjs';

export type TokenReaperState = 'starting' | 'running' | 'failed' | 'stopped';

export interface TokenReaperStatus {
  readonly state: TokenReaperState;
  /**
   * Running, with its listener up (or down for less than LISTENER_DOWN_UNHEALTHY_AFTER), and
   * with the tables, trigger and rights as needed: what the health indicator reports.
   */
  readonly up: boolean;
  /** Running and ready as the CLI's /readyz means it: `up`, and nothing passing either. */
  readonly ready: boolean;
  /** Why it is not up or not ready: the error of a failed start, or the readiness problems. */
  readonly problem: string | null;
  /** The readiness reasons: a dropped trigger, the listener reconnecting, a failed sweep… */
  readonly reasons: readonly string[];
  /** The next start attempt after a failed one, or null. */
  readonly retryAt: string | null;
}

/** What sweep() and explain() reject with while the reaper is not running. */
export class TokenReaperUnavailableError extends Error {
  override name = 'TokenReaperUnavailableError';
}

/** The pause before the first new attempt at a failed start; it doubles up to the maximum. */
const FIRST_RETRY_MS = 5_000;
const MAX_RETRY_MS = 5 * 60_000;

/** The parts of `cron` (the package @nestjs/schedule builds its jobs with) used here. */
interface Cron {
  CronJob: { from(options: Record<string, unknown>): CronJobLike };
}
interface CronJobLike {
  start(): void;
  stop(): unknown;
}

/** A start that failed for good: a setting is wrong, and only a new deployment changes it. */
class Misconfigured extends Error {}

export class TokenReaper implements OnApplicationBootstrap, OnApplicationShutdown {
  readonly #options: TokenReaperModuleOptions;
  readonly #moduleRef: ModuleRef;
  readonly #logger = new Logger('TokenReaper');
  #state: TokenReaperState = 'stopped';
  #reaper: Core.Reaper | null = null;
  #problem: string | null = null;
  #starting: Promise<void> | null = null;
  #retryTimer: NodeJS.Timeout | null = null;
  #retryAt: Date | null = null;
  #retryPauseMs = FIRST_RETRY_MS;
  #cronJob: { registry: SchedulerRegistry; name: string } | null = null;
  #shutDown = false;
  /** The core's redaction, once the core is loaded: the module's own lines go through it. */
  #redact: (text: string) => string = (text) => text;

  constructor(options: TokenReaperModuleOptions, moduleRef: ModuleRef) {
    this.#options = options;
    this.#moduleRef = moduleRef;
  }

  async onApplicationBootstrap(): Promise<void> {
    const starting = this.#start();
    if (this.#options.failFast === true) await starting;
    else starting.catch(() => undefined); // logged, and kept for status()
  }

  async onApplicationShutdown(): Promise<void> {
    this.#shutDown = true;
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#retryAt = null;
    await this.#starting?.catch(() => undefined);
    this.#removeCronJob();
    await this.#reaper?.stop();
    this.#reaper = null;
    this.#state = 'stopped';
  }

  /** One sweep now; joins one already running. Failures are outcomes, as in the core. */
  async sweep(options?: Core.ReaperSweepOptions): Promise<Core.SweepOutcome> {
    return this.#running().sweep(options);
  }

  /** Each target's shape, rule and counts, as `token-reaper explain --json` prints them. */
  async explain(): Promise<Core.Explanation> {
    return this.#running().explain();
  }

  /** The core reaper while running (its events, config and readiness), else null. */
  get reaper(): Core.Reaper | null {
    return this.#state === 'running' ? this.#reaper : null;
  }

  status(): TokenReaperStatus {
    const reaper = this.reaper;
    const readiness = reaper?.readiness();
    const reasons = readiness?.reasons ?? [];
    // Problems of the tables, the rights or the server fail the health check; what passes on
    // its own (the listener reconnecting, one failed sweep) is shown, not failed on.
    const up =
      reaper !== null && reaper.health().healthy && (readiness?.problems.length ?? 0) === 0;
    const unready = readiness?.problems.map((problem) => problem.message).join(' ');
    return {
      state: this.#state,
      up,
      ready: up && readiness?.ready === true,
      problem: this.#problem ?? (unready || (reasons.length > 0 ? reasons.join(', ') : null)),
      reasons,
      retryAt: this.#retryAt?.toISOString() ?? null,
    };
  }

  #running(): Core.Reaper {
    const reaper = this.reaper;
    if (reaper !== null) return reaper;
    throw new TokenReaperUnavailableError(
      `token-reaper is ${this.#state}${this.#problem ? `: ${this.#problem}` : ''}`,
    );
  }

  #start(): Promise<void> {
    this.#state = 'starting';
    this.#starting = this.#attempt().then(
      (reaper) => {
        if (reaper === null) return; // shut down meanwhile
        this.#reaper = reaper;
        this.#state = 'running';
        this.#problem = null;
        this.#retryPauseMs = FIRST_RETRY_MS;
      },
      (error: unknown) => {
        this.#state = 'failed';
        throw error;
      },
    );
    return this.#starting;
  }

  /** Loads, configures and starts the core reaper; null when the app shut down meanwhile. */
  async #attempt(): Promise<Core.Reaper | null> {
    let core: typeof Core;
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded late on purpose (above)
      core = require('../index.js') as typeof Core;
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- the core's, loaded with it
      this.#redact = (require('../redact.js') as typeof import('../redact.js')).redactText;
    } catch (error) {
      throw this.#failed(error, 'could not be loaded', false);
    }
    const registry = this.#schedulerRegistry();
    let reaper: Core.Reaper;
    try {
      reaper = await core.createReaper({
        settings: this.#options.settings,
        targets: this.#options.targets,
        ...(this.#options.logger ? { logger: this.#options.logger } : { hostLogger: this.#logger }),
        schedule: registry === null,
      });
    } catch (error) {
      const misconfigured = error instanceof core.ConfigurationError;
      throw this.#failed(
        error,
        misconfigured ? 'is not configured right' : 'could not start',
        !misconfigured,
      );
    }
    try {
      const job =
        registry !== null && reaper.config.scheduleEnabled
          ? this.#cronJobFor(registry, reaper)
          : null;
      if (this.#shutDown) {
        await reaper.stop();
        return null;
      }
      await reaper.start();
      if (this.#shutDown) {
        await reaper.stop();
        return null;
      }
      if (job !== null && registry !== null) this.#addCronJob(registry, job, reaper);
    } catch (error) {
      await reaper.stop().catch(() => undefined);
      const misconfigured = error instanceof Misconfigured;
      throw this.#failed(
        error,
        misconfigured ? 'is not configured right' : 'could not start',
        !misconfigured,
      );
    }
    return reaper;
  }

  /** Logs a failed start, keeps it for status(), and plans the next attempt. */
  #failed(error: unknown, what: string, retry: boolean): unknown {
    const message = this.#redact(error instanceof Error ? error.message : String(error));
    this.#problem = `token-reaper ${what}: ${message}`;
    const retrying = retry && !this.#shutDown && this.#options.failFast !== true;
    this.#logger.error(
      retrying
        ? `${this.#problem} (the app keeps serving; trying again in ${Math.round(this.#retryPauseMs / 1000)} s)`
        : `${this.#problem}${this.#options.failFast === true ? '' : ' (the app keeps serving)'}`,
    );
    if (retrying) {
      this.#retryAt = new Date(Date.now() + this.#retryPauseMs);
      this.#retryTimer = setTimeout(() => {
        this.#retryTimer = null;
        this.#retryAt = null;
        this.#start().catch(() => undefined);
      }, this.#retryPauseMs);
      this.#retryTimer.unref();
      this.#retryPauseMs = Math.min(this.#retryPauseMs * 2, MAX_RETRY_MS);
    }
    return error;
  }

  /** The app's SchedulerRegistry, when @nestjs/schedule is installed and its module imported. */
  #schedulerRegistry(): SchedulerRegistry | null {
    let schedule: typeof import('@nestjs/schedule');
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports -- an optional peer dependency
      schedule = require('@nestjs/schedule') as typeof import('@nestjs/schedule');
    } catch {
      return null;
    }
    try {
      return this.#moduleRef.get(schedule.SchedulerRegistry, { strict: false });
    } catch {
      return null;
    }
  }

  /**
   * The sweep as a job of @nestjs/schedule's own `cron`, not yet started. `cron` reads
   * REFRESH_TOKEN_CLEANUP_CRON here, as the app's own jobs: an expression it refuses (node-cron
   * accepted it), or a job name the app already uses, is a setting to change.
   */
  #cronJobFor(registry: SchedulerRegistry, reaper: Core.Reaper): CronJobLike {
    const name = this.#options.cronJobName ?? DEFAULT_CRON_JOB_NAME;
    if (registry.doesExist('cron', name)) {
      throw new Misconfigured(
        `the app's SchedulerRegistry already has a cron job named ${name}; set cronJobName to another name`,
      );
    }
    const { CronJob } = createRequire(require.resolve('@nestjs/schedule'))('cron') as Cron;
    const { schedule, timezone } = reaper.config.sweep;
    try {
      return CronJob.from({
        cronTime: schedule,
        onTick: () => void reaper.sweep({ trigger: 'schedule' }),
        start: false,
        ...(timezone === null ? {} : { timeZone: timezone }),
      });
    } catch (error) {
      throw new Misconfigured(
        `REFRESH_TOKEN_CLEANUP_CRON=${JSON.stringify(schedule)} is refused by @nestjs/schedule's cron (${(error as Error).message}); use five or six plain fields`,
      );
    }
  }

  #addCronJob(registry: SchedulerRegistry, job: CronJobLike, reaper: Core.Reaper) {
    const name = this.#options.cronJobName ?? DEFAULT_CRON_JOB_NAME;
    registry.addCronJob(name, job as Parameters<SchedulerRegistry['addCronJob']>[1]);
    this.#cronJob = { registry, name };
    job.start();
    this.#logger.log(
      `sweeps on "${reaper.config.sweep.schedule}" as the SchedulerRegistry cron job ${name}`,
    );
  }

  #removeCronJob() {
    if (this.#cronJob === null) return;
    const { registry, name } = this.#cronJob;
    this.#cronJob = null;
    // ScheduleModule may have removed its jobs already on shutdown.
    if (registry.doesExist('cron', name)) registry.deleteCronJob(name);
  }
}
