// A health indicator in @nestjs/terminus's shape, without depending on it: a healthy check
// resolves to `{ [key]: { status: 'up', … } }`, and an unhealthy one rejects with an error
// carrying `isHealthCheckError` and `causes`, which is what terminus 10 and 11 both read.
import type { TokenReaper, TokenReaperStatus } from './token-reaper.cjs';

export type TokenReaperHealthResult = Record<
  string,
  { status: 'up' | 'down' } & Omit<TokenReaperStatus, 'up'>
>;

export class TokenReaperHealthCheckError extends Error {
  override name = 'TokenReaperHealthCheckError';
  readonly isHealthCheckError = true;
  readonly causes: TokenReaperHealthResult;

  constructor(message: string, causes: TokenReaperHealthResult) {
    super(message);
    this.causes = causes;
  }
}

export class TokenReaperHealthIndicator {
  readonly #reaper: TokenReaper;

  constructor(reaper: TokenReaper) {
    this.#reaper = reaper;
  }

  /** For HealthCheckService.check: `() => indicator.isHealthy('token-reaper')`. */
  async isHealthy(key = 'token-reaper'): Promise<TokenReaperHealthResult> {
    const { up, ...status } = this.#reaper.status();
    const result: TokenReaperHealthResult = { [key]: { status: up ? 'up' : 'down', ...status } };
    if (up) return result;
    throw new TokenReaperHealthCheckError(
      status.problem ?? `token-reaper is ${status.state}`,
      result,
    );
  }
}
