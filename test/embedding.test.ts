// The library API as the README's NestJS example uses it: the TokenCleanupService provider,
// minus its decorators, runs here without the CLI, against a real PostgreSQL.
import { expect } from 'chai';
import { createReaper, type Reaper, type SweepOutcome } from '../src/index.js';
import { ConfigurationError } from '../src/errors.js';
import { createCapturingLogger } from './support/capture-logger.js';
import { runCli, waitFor } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import {
  createReferenceSchema,
  insertRandomRows,
  revokeAndAwaitPurge,
} from './support/fixtures.js';

// ---- The README's example, as a NestJS provider would hold it ----
class TokenCleanupService {
  private reaper?: Reaper;
  readonly outcomes: SweepOutcome[] = [];

  constructor(private readonly settings: Record<string, string | undefined>) {}

  async onModuleInit() {
    this.reaper = await createReaper({ settings: this.settings, logger: capture.logger });
    this.reaper.events.on('sweep', (outcome) => this.outcomes.push(outcome));
    await this.reaper.start();
  }

  async onModuleDestroy() {
    await this.reaper?.stop();
  }

  /** For an admin endpoint: a sweep now. */
  sweepNow() {
    return this.reaper!.sweep();
  }
}
// ----

const capture = createCapturingLogger('info');

describe('the library API', () => {
  const database = useTestDatabase('embedding');

  before(async () => {
    await createReferenceSchema(database.current);
    await insertRandomRows(database.current, { table: 'refresh_tokens', count: 2_000, seed: 0.1 });
    await insertRandomRows(database.current, { table: 'password_resets', count: 500, seed: 0.2 });
    const install = await runCli(['install'], { DATABASE_URL: database.url });
    expect(install.code, install.stderr).to.equal(0);
  });

  it('runs the NestJS example: purges revocations, sweeps on demand, stops, and installs no signal handler', async () => {
    const signals = ['SIGTERM', 'SIGINT', 'SIGUSR1'] as const;
    const before = signals.map((signal) => process.listenerCount(signal));
    const service = new TokenCleanupService({ DATABASE_URL: database.url, NODE_ENV: 'test' });
    await service.onModuleInit();
    try {
      expect(signals.map((signal) => process.listenerCount(signal))).to.deep.equal(before);
      await revokeAndAwaitPurge(database);
      const outcome = await service.sweepNow();
      expect(outcome).to.include({ status: 'finished', trigger: 'api' });
      expect(service.outcomes).to.have.length(1);
      const dead = await database.query(
        `SELECT count(*)::int AS count FROM refresh_tokens WHERE revoked OR expires_at < now()`,
      );
      expect(dead[0]!.count).to.equal(0);
    } finally {
      await service.onModuleDestroy();
    }
    expect(capture.events('daemon.stopped')).to.have.length(1);
  });

  it('keeps purging when a listener of its events throws on every event, and logs it', async () => {
    const logs = createCapturingLogger('info');
    const reaper = await createReaper({
      settings: { DATABASE_URL: database.url, NODE_ENV: 'test' },
      logger: logs.logger,
    });
    for (const event of ['purge', 'catchUp', 'listener', 'sweep'] as const) {
      reaper.events.on(event, () => {
        throw new Error(`a bug in the host's ${event} listener`);
      });
    }
    reaper.events.on('purge', () => Promise.reject(new Error('an async bug')));
    await reaper.start();
    try {
      for (let round = 0; round < 3; round += 1) {
        const [token] = await database.query(
          `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
           VALUES (gen_random_uuid(), md5(random()::text), now() + interval '1 day') RETURNING id::text`,
        );
        await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [token!.id]);
        await waitFor(
          async () =>
            (await database.query('SELECT 1 FROM refresh_tokens WHERE id = $1', [token!.id]))
              .length === 0,
          { message: `revocation ${round + 1} purged despite the throwing listeners` },
        );
      }
      const outcome = await reaper.sweep();
      expect(outcome.status).to.equal('finished');
      await waitFor(() => logs.events('events.listener_failed').length >= 8, {
        message: 'the failures logged',
      });
      const failed = logs.events('events.listener_failed');
      expect(new Set(failed.map((line) => line['emitted']))).to.include.all.keys(
        'purge',
        'catchUp',
        'listener',
        'sweep',
      );
      expect(failed.map((line) => line['error'])).to.deep.include({
        name: 'Error',
        message: 'an async bug',
      });
      expect(logs.events('purge.failed')).to.deep.equal([]);
    } finally {
      await reaper.stop();
    }
  });

  it('reports bad settings before touching the database', async () => {
    try {
      await createReaper({
        settings: { DATABASE_URL: 'mysql://x', REFRESH_TOKEN_CLEANUP_CRON: 'often' },
      });
      expect.fail('createReaper accepted bad settings');
    } catch (error) {
      expect(error).to.be.instanceOf(ConfigurationError);
      expect((error as ConfigurationError).problems).to.have.length(2);
    }
  });

  it('takes a targets file’s content, writes short lines to a host’s logger, and leaves the schedule to the host', async () => {
    const lines: { level: string; line: string }[] = [];
    const host = {
      log: (line: string) => lines.push({ level: 'log', line }),
      warn: (line: string) => lines.push({ level: 'warn', line }),
      error: (line: string) => lines.push({ level: 'error', line }),
    };
    const reaper = await createReaper({
      // No NODE_ENV=test: only `schedule: false` keeps the reaper from scheduling sweeps.
      settings: { DATABASE_URL: database.url },
      targets: {
        targets: [
          {
            table: 'password_resets',
            marker: { column: 'used' },
            expiry: { column: 'expires_at' },
          },
        ],
      },
      hostLogger: host,
      schedule: false,
    });
    await reaper.start();
    try {
      const explanation = await reaper.explain();
      expect(explanation.targets.map((target) => target.table)).to.deep.equal([
        'public.password_resets',
      ]);
      const outcome = await reaper.sweep({ trigger: 'schedule' });
      expect(outcome).to.include({ status: 'finished', trigger: 'schedule' });
      expect(Object.keys('tables' in outcome ? outcome.tables : {})).to.deep.equal([
        'public.password_resets',
      ]);
    } finally {
      await reaper.stop();
    }
    const started = lines.find(({ line }) => line.startsWith('daemon.started '));
    expect(started, 'daemon.started went to the host logger').to.include({ level: 'log' });
    // No schedule of its own, and none of the time and level the host prints itself.
    expect(started!.line)
      .not.to.include('schedule=')
      .and.not.to.match(/^\d\d:/);
    expect(lines.map(({ line }) => line).join('\n')).not.to.include(database.url);
    expect(lines.some(({ line }) => line.startsWith('sweep.finished '))).to.equal(true);
  });

  it('names the targets option in the problems of its content', async () => {
    try {
      await createReaper({
        settings: { DATABASE_URL: database.url, REFRESH_TOKENS_TABLE: 'refresh_tokens' },
        targets: { targets: [{ table: 'password_resets' }] },
      });
      expect.fail('createReaper accepted a target that can never be dead');
    } catch (error) {
      expect(error).to.be.instanceOf(ConfigurationError);
      const problems = (error as ConfigurationError).problems.join('\n');
      expect(problems).to.include('REFRESH_TOKENS_TABLE is set, and so is the targets option');
      expect(problems).to.include('targets: targets[0]');
    }
  });
});
