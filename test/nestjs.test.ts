// token-reaper/nestjs in real Nest 10 and Nest 11 apps (test/fixtures/nestjs), with the package
// installed as a user installs it: the app boots, purges a revocation, sweeps on a schedule and
// on demand, reports its health through @nestjs/terminus, survives a broken configuration and
// a missing table, and closes cleanly; and a ts-jest spec of a team's module imports it.
import { expect } from 'chai';
import { stripVTControlCharacters } from 'node:util';
import { runCli, waitFor } from './support/cli.js';
import { prepareNestProject, runOrExplain, type NestFixture } from './support/consumers.js';
import { useTestDatabase } from './support/database.js';
import {
  createReferenceSchema,
  insertRandomRows,
  revokeAndAwaitPurge,
} from './support/fixtures.js';
import { launchNestApp, type AppEvent, type NestApp } from './support/nest-app.js';

/** Whether Jest can require ES modules here: Node 24.9+, with --experimental-vm-modules. */
const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
const nodeRequiresEsmInJest = major > 24 || (major === 24 && minor >= 9);

const FIXTURES: readonly { fixture: NestFixture; jestRequiresEsm: boolean }[] = [
  { fixture: 'nest10', jestRequiresEsm: false }, // Jest 29
  { fixture: 'nest11', jestRequiresEsm: nodeRequiresEsmInJest }, // Jest 30.5
];

for (const { fixture, jestRequiresEsm } of FIXTURES) {
  describe(`token-reaper/nestjs in a ${fixture.replace('nest', 'Nest ')} app`, function () {
    // The first run installs the app's packages from the npm registry.
    this.timeout(120_000);
    const database = useTestDatabase(`nestjs_${fixture}`);
    let project: string;
    let app: NestApp | null = null;

    before(async function () {
      this.timeout(15 * 60_000);
      project = await prepareNestProject(fixture);
      await createReferenceSchema(database.current);
      await insertRandomRows(database.current, { table: 'refresh_tokens', count: 500, seed: 0.3 });
      const install = await runCli(['install'], { DATABASE_URL: database.url });
      expect(install.code, install.stderr).to.equal(0);
    });

    afterEach(async () => {
      await app?.process.kill();
      app = null;
    });

    it('boots, purges a revocation, sweeps as a SchedulerRegistry job and on demand, answers /health, and closes cleanly', async () => {
      app = launchNestApp(project, {
        settings: { DATABASE_URL: database.url, REFRESH_TOKEN_CLEANUP_CRON: '* * * * * *' },
        schedule: true,
      });
      await app.listening;
      const status = await app.settled();
      expect(status).to.include({ state: 'running', up: true, ready: true, problem: null });
      const health = await app.get('/health');
      expect(health.status).to.equal(200);
      expect(health.body).to.nested.include({ 'info.token-reaper.status': 'up' });
      expect(await app.ask('cronJobs')).to.deep.include({ names: ['token-reaper-sweep'] });

      await app.ask('watch');
      await app.waitForEvent(
        (event) => event.event === 'sweep' && event.trigger === 'schedule',
        'a sweep started by the SchedulerRegistry job',
      );
      // The job stopped, no sweep every second can delete the revocation before the purge does;
      // and the start's catch-up, which does not hold up the start, must be done with the
      // fixture's revoked rows, or it may take the revocation too.
      await app.ask('stopCronJob');
      await waitFor(
        async () =>
          (await database.query('SELECT 1 FROM refresh_tokens WHERE revoked LIMIT 1')).length === 0,
        { message: 'the start’s catch-up to delete the revoked rows' },
      );
      await revokeAndAwaitPurge(database);
      await app.waitForEvent(
        (event) => event.event === 'purge' && Number(event.deleted) >= 1,
        'a purge batch that deleted the revocation',
      );
      // A sweep asked for runs as its own (the first may join the last scheduled one).
      const outcome = await waitFor(
        async () => {
          const { outcome } = await app!.ask<{ outcome: { status: string; trigger: string } }>(
            'sweep',
          );
          return outcome.trigger === 'api' && outcome;
        },
        { message: 'a sweep started on demand' },
      );
      expect(outcome).to.include({ status: 'finished', trigger: 'api' });
      const dead = await database.query(
        `SELECT count(*)::int AS count FROM refresh_tokens WHERE revoked OR expires_at < now()`,
      );
      expect(dead[0]!.count).to.equal(0);
      const { explanation } = await app.ask<{ explanation: { targets: { table: string }[] } }>(
        'explain',
      );
      expect(explanation.targets.map((target) => target.table)).to.include('public.refresh_tokens');

      const exit = await app.close();
      expect(exit).to.deep.include({ code: 0 });
      // Through Nest's Logger: its own prefix and context, then the event. The schedule is the
      // registry's job, so the reaper reports none of its own.
      const output = stripVTControlCharacters(app.process.stdout);
      const started = /\[TokenReaper\] daemon\.started token-reaper.*/.exec(output)?.[0];
      expect(started, 'daemon.started through Nest').to.be.a('string');
      expect(started).not.to.include('schedule=');
      expect(output).to.match(/\[TokenReaper\] daemon\.stopped/);
      expect(output).not.to.include('"event"');
    });

    it('sweeps on its own schedule when the app does not import ScheduleModule, and takes settings that are numbers', async () => {
      app = launchNestApp(project, {
        settings: {
          DATABASE_URL: database.url,
          REFRESH_TOKEN_CLEANUP_CRON: '* * * * * *',
          SWEEP_BATCH_PAGES: 50,
        },
        schedule: false,
      });
      expect((await app.settled()).state).to.equal('running');
      expect(stripVTControlCharacters(app.process.stdout)).to.match(
        /daemon\.started .*schedule="\* \* \* \* \* \*"/,
      );
      await app.ask('watch');
      await app.waitForEvent(
        (event: AppEvent) => event.event === 'sweep' && event.trigger === 'schedule',
        'a sweep started by the reaper’s own schedule',
      );
      expect(await app.close()).to.deep.include({ code: 0 });
    });

    it('stops the reaper on SIGTERM through enableShutdownHooks', async () => {
      app = launchNestApp(project, {
        settings: { DATABASE_URL: database.url },
        schedule: true,
      });
      expect((await app.settled()).state).to.equal('running');
      app.process.signal('SIGTERM');
      // Nest closes the app, then raises the signal again to end the process.
      expect(await app.process.exited).to.deep.include({ signal: 'SIGTERM' });
      expect(stripVTControlCharacters(app.process.stdout)).to.match(
        /\[TokenReaper\] daemon\.stopped/,
      );
    });

    it('keeps serving with a broken configuration, logs it as an error and reports it on /health', async () => {
      app = launchNestApp(project, {
        settings: { DATABASE_URL: database.url, SWEEP_BATCH_PAGES: 'many' },
        schedule: true,
      });
      await app.listening;
      const status = await app.settled();
      expect(status.state).to.equal('failed');
      expect(status.problem).to.include('SWEEP_BATCH_PAGES');
      expect(status.retryAt, 'a setting only changes with a new deployment').to.equal(null);
      const health = await app.get('/health');
      expect(health.status).to.equal(503);
      expect(health.body).to.nested.include({ 'error.token-reaper.status': 'down' });
      expect((await app.get('/ping')).status).to.equal(200);
      // Nest's ConsoleLogger writes errors to stderr.
      expect(stripVTControlCharacters(app.process.stderr)).to.match(
        /ERROR .*\[TokenReaper\] .*SWEEP_BATCH_PAGES/,
      );
      let refused: unknown;
      await app.ask('sweep').catch((error: unknown) => (refused = error));
      expect(refused).to.have.property('name', 'TokenReaperUnavailableError');
      expect(await app.close()).to.deep.include({ code: 0 });
    });

    it('reports a missing table, keeps serving, and starts on a later attempt once the table exists', async function () {
      this.timeout(60_000);
      const table = `late_tokens_${fixture}`;
      app = launchNestApp(project, {
        // Readiness checked every second: an attempt that starts before install has made the
        // trigger sees it as soon as it is there.
        settings: {
          DATABASE_URL: database.url,
          REFRESH_TOKENS_TABLE: table,
          READINESS_CHECK_INTERVAL: '1s',
        },
        schedule: true,
      });
      const status = await app.settled();
      expect(status.state).to.equal('failed');
      expect(status.problem).to.include(table);
      expect(status.retryAt).to.be.a('string');
      expect((await app.get('/health')).status).to.equal(503);
      expect((await app.get('/ping')).status).to.equal(200);

      // The migration that makes the table, and install, run after the app has started.
      await database.query(`CREATE TABLE ${table} (LIKE refresh_tokens INCLUDING ALL)`);
      const install = await runCli(['install'], {
        DATABASE_URL: database.url,
        REFRESH_TOKENS_TABLE: table,
      });
      expect(install.code, install.stderr).to.equal(0);
      await waitFor(async () => (await app!.get('/health')).status === 200, {
        message: 'the reaper to start on a later attempt',
        timeoutMs: 30_000,
        intervalMs: 250,
      });
      expect(await app.close()).to.deep.include({ code: 0 });

      // One configuration owns a database's revoke triggers: that install dropped the trigger
      // of refresh_tokens, no longer purged promptly. The tests after this one run the app's
      // usual configuration, so its install runs again, as it would in a real migration back.
      const triggers = () =>
        database.query(
          `SELECT tgrelid::regclass::text AS table FROM pg_trigger
           WHERE tgname = 'token_reaper_notify_revoked' AND tgparentid = 0 ORDER BY 1`,
        );
      expect(await triggers()).to.deep.equal([{ table }]);
      const restored = await runCli(['install'], { DATABASE_URL: database.url });
      expect(restored.code, restored.stderr).to.equal(0);
      expect(await triggers()).to.deep.equal([{ table: 'refresh_tokens' }]);
    });

    it('closes during the pause before another attempt, and makes no attempt after', async () => {
      app = launchNestApp(project, {
        settings: { DATABASE_URL: database.url, REFRESH_TOKENS_TABLE: 'never_made' },
        schedule: true,
      });
      const status = await app.settled();
      expect(status.state).to.equal('failed');
      expect(status.retryAt).to.be.a('string');
      expect(await app.close()).to.deep.include({ code: 0 });
      const attempts = stripVTControlCharacters(app.process.stderr).match(/could not start/g);
      expect(attempts).to.have.length(1);
    });

    it('reports a schedule that @nestjs/schedule’s cron refuses as a setting to change, without retrying', async () => {
      app = launchNestApp(project, {
        // node-cron takes L (the last day of the month); cron does not.
        settings: { DATABASE_URL: database.url, REFRESH_TOKEN_CLEANUP_CRON: '0 3 L * *' },
        schedule: true,
      });
      const status = await app.settled();
      expect(status.state).to.equal('failed');
      expect(status.problem).to.include('REFRESH_TOKEN_CLEANUP_CRON');
      expect(status.retryAt).to.equal(null);
      expect(await app.close()).to.deep.include({ code: 0 });
    });

    it('with failFast, a broken configuration stops the app from starting', async () => {
      app = launchNestApp(project, {
        settings: { DATABASE_URL: 'not a url' },
        schedule: true,
        failFast: true,
      });
      let failure: unknown;
      await app.listening.catch((error: unknown) => (failure = error));
      expect(String(failure)).to.include('DATABASE_URL');
      expect((await app.process.exited).code).to.equal(1);
    });

    it(`a ts-jest spec imports the module and boots it${jestRequiresEsm ? ', with the reaper running under --experimental-vm-modules' : ''}`, async () => {
      const runs = [{ expect: 'unloadable', nodeOptions: '' }];
      if (jestRequiresEsm)
        runs.push({ expect: 'running', nodeOptions: '--experimental-vm-modules' });
      for (const { expect: expected, nodeOptions } of runs) {
        const { stderr } = await runOrExplain(
          process.execPath,
          ['node_modules/jest/bin/jest.js', '--ci', '--colors=false'],
          {
            cwd: project,
            env: {
              PATH: process.env.PATH,
              DATABASE_URL: database.url,
              EXPECT_REAPER: expected,
              NODE_OPTIONS: nodeOptions,
            },
            timeout: 90_000,
          },
        );
        expect(stderr, `jest with EXPECT_REAPER=${expected}`).to.match(/Tests: +2 passed, 2 total/);
      }
    });
  });
}
