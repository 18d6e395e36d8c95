// token-reaper/nestjs: the NestJS module. README, "NestJS", shows it in an app.
export { TokenReaperModule, TOKEN_REAPER_OPTIONS } from './module.cjs';
export {
  TokenReaper,
  TokenReaperUnavailableError,
  type TokenReaperState,
  type TokenReaperStatus,
} from './token-reaper.cjs';
export {
  TokenReaperHealthCheckError,
  TokenReaperHealthIndicator,
  type TokenReaperHealthResult,
} from './health.cjs';
export type { TokenReaperModuleAsyncOptions, TokenReaperModuleOptions } from './options.cjs';
export type {
  Explanation,
  HostLogger,
  Logger,
  ReaperSweepOptions,
  SweepOutcome,
} from '../index.js';
