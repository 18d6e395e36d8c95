// `token-reaper partition convert`: not implemented yet.
import type { Config } from './config.js';
import type { Logger } from './logger.js';

export interface ConvertOptions {
  config: Config;
  logger: Logger;
  /** Write the plan's SQL to stdout and change nothing. */
  print: boolean;
}

/** Returns the exit code. */
export async function convertToPartitioned(options: ConvertOptions): Promise<number> {
  void options;
  throw new Error('partition convert is not implemented yet');
}
