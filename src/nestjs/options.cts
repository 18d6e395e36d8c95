// What TokenReaperModule.forRoot and forRootAsync take.
import type { FactoryProvider, ModuleMetadata } from '@nestjs/common';
import type { ReaperOptions } from '../index.js';

export interface TokenReaperModuleOptions extends Omit<ReaperOptions, 'schedule' | 'hostLogger'> {
  /**
   * Rethrow a configuration, schema or database problem at bootstrap, so that the app fails
   * to start. Off by default: the problem is logged as an error and reported by
   * TokenReaperHealthIndicator, and the app keeps serving.
   */
  failFast?: boolean;
  /** The name of the SchedulerRegistry cron job that runs the sweep, when the app imports ScheduleModule. */
  cronJobName?: string;
}

export interface TokenReaperModuleAsyncOptions {
  /** Modules whose providers `inject` names: ConfigModule, say. */
  imports?: ModuleMetadata['imports'];
  // Nest's own factories take any arguments; their types come from `inject`.
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  useFactory: (...args: any[]) => TokenReaperModuleOptions | Promise<TokenReaperModuleOptions>;
  inject?: FactoryProvider['inject'];
}

export const DEFAULT_CRON_JOB_NAME = 'token-reaper-sweep';
