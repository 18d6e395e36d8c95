// The life a daemon lives over months, on a real PostgreSQL: partitions dropped and made under
// it, its listener's backend killed, a search_path that changes while it runs.
import { expect } from 'chai';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { createPartitionedTable, createReferenceSchema } from './support/fixtures.js';

async function stop(daemon: ProcessHandle) {
  daemon.signal('SIGTERM');
  expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({ code: 0, signal: null });
}

describe('the daemon’s lifecycle', () => {
  const database = useTestDatabase('lifecycle');
  const query = (text: string, parameters?: unknown[]) => database.query(text, parameters);

  it('catches up across partitions dropped and made since it started, after its listener is killed', async () => {
    const table = 'nightly.refresh_tokens';
    await createPartitionedTable(database.current, 'nightly', { fromDay: -3, toDay: 3 });
    const environment = {
      DATABASE_URL: database.url,
      REFRESH_TOKENS_TABLE: table,
      PASSWORD_RESETS_TABLE: 'none',
    };
    const install = await runCli(['install'], environment);
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    // Expired rows in the past days' partitions, which the sweep drops.
    await query(
      `INSERT INTO ${table} (user_id, token_hash, expires_at)
       SELECT gen_random_uuid(), md5(random()::text || i), now() - (i % 3 + 1) * interval '1 day'
       FROM generate_series(1, 300) i`,
    );
    const daemon = spawnDaemon(['start'], environment);
    await daemon.waitForLog('listener.caught_up');
    try {
      const since = daemon.logs.length;
      daemon.signal('SIGUSR1');
      const swept = await daemon.waitForLog('sweep.finished', undefined, since);
      expect((swept.tables as Record<string, { partitionsDropped: number }>)[table])
        .to.have.property('partitionsDropped')
        .that.is.at.least(2);
      // A day the daemon never described, as premaking or a conversion would make it.
      await query(
        `CREATE TABLE nightly.refresh_tokens_later PARTITION OF ${table}
         FOR VALUES FROM (now() + interval '10 days') TO (now() + interval '11 days')`,
      );
      // Inserted already revoked: no UPDATE, so no NOTIFY; only a catch-up can find them.
      await query(
        `INSERT INTO ${table} (user_id, token_hash, revoked, expires_at)
         SELECT gen_random_uuid(), md5(random()::text || i), true,
                now() + CASE WHEN i % 2 = 0 THEN interval '1 hour' ELSE interval '10 days 1 hour' END
         FROM generate_series(1, 40) i`,
      );
      const before = daemon.logs.length;
      const terminated = await query(
        `SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'token-reaper-listener'`,
      );
      expect(terminated).to.deep.equal([{ done: true }]);
      const caughtUp = await daemon.waitForLog(
        (line) => line.event === 'listener.caught_up',
        20_000,
        before,
      );
      expect(caughtUp, daemon.describeOutput()).to.include({ deleted: 40, skipped: 0 });
      const left = await query(`SELECT count(*)::int AS count FROM ${table} WHERE revoked`);
      expect(left[0]!.count).to.equal(0);
      expect(daemon.logs.filter((line) => line.event === 'listener.catch_up_failed')).to.deep.equal(
        [],
      );
    } finally {
      await stop(daemon);
    }
  });

  it('warns of a table of the same name earlier on the search_path, and keeps sweep and purge on the one it found', async () => {
    await query('CREATE SCHEMA auth');
    await createReferenceSchema(database.current, { schema: 'auth', passwordResetsTable: null });
    // The decoy: the same name in public, holding rows that are dead by every rule.
    await query(
      `CREATE TABLE public.refresh_tokens (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
         revoked boolean NOT NULL DEFAULT true, expires_at timestamptz NOT NULL DEFAULT now() - interval '1 day')`,
    );
    await query(`INSERT INTO public.refresh_tokens SELECT FROM generate_series(1, 10)`);
    await query(`ALTER DATABASE ${database.name} SET search_path = auth, public`);
    const environment = {
      DATABASE_URL: database.url,
      REFRESH_TOKENS_TABLE: 'refresh_tokens',
      PASSWORD_RESETS_TABLE: 'none',
    };
    const install = await runCli(['install'], environment);
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    const explain = await runCli(['explain'], environment);
    expect(explain.stdout).to.include('public.refresh_tokens is not');

    const daemon = spawnDaemon(['start'], environment);
    try {
      await daemon.waitForLog('listener.caught_up');
      const warning = daemon.logs.find((line) => line.event === 'daemon.target_warning');
      expect(warning, daemon.describeOutput()).to.include({ table: 'auth.refresh_tokens' });
      expect(warning!.message).to.include('public.refresh_tokens');

      // New sessions now find the decoy first; the daemon must not follow them.
      await query(`ALTER DATABASE ${database.name} SET search_path = public, auth`);
      await query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = 'token-reaper'`);
      const [token] = await query(
        `INSERT INTO auth.refresh_tokens (user_id, token_hash, expires_at)
         VALUES (gen_random_uuid(), md5(random()::text), now() + interval '1 day') RETURNING id::text`,
      );
      await query('UPDATE auth.refresh_tokens SET revoked = true WHERE id = $1', [token!.id]);
      await waitFor(
        async () =>
          (await query('SELECT 1 FROM auth.refresh_tokens WHERE id = $1', [token!.id])).length ===
          0,
        { message: 'the revoked token purged from auth.refresh_tokens' },
      );
      const since = daemon.logs.length;
      daemon.signal('SIGUSR1');
      const swept = await daemon.waitForLog('sweep.finished', undefined, since);
      expect(Object.keys(swept.tables as object)).to.deep.equal(['auth.refresh_tokens']);
      const decoy = await query('SELECT count(*)::int AS count FROM public.refresh_tokens');
      expect(decoy[0]!.count, 'the decoy is untouched').to.equal(10);
    } finally {
      await stop(daemon);
    }
  });
});
