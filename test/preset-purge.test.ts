// The prompt purge on the systems' real schemas, wherever the system revokes with an UPDATE,
// under each PURGE_SOURCE: `install --config` puts the trigger (notify) or the publication and
// slot (wal) on each preset table, or nothing (poll); a running daemon learns of the
// revocations the system's own UPDATE makes, and deletes exactly those rows, re-checked, while
// every row not revoked stays. Ids of every type the presets have go through the payload and
// the decoded change: Passport's char(80), Doorkeeper's and DOT's bigint, and a bigint past 2^53.
import { expect } from 'chai';
import pg from 'pg';
import { openAuthDatabase, rowKeys, type Fill } from './support/auth-schemas.js';
import { runCli, spawnDaemon, waitFor } from './support/cli.js';
import { useLogicalServer, useTestDatabase } from './support/database.js';
import { writeTargetsFile } from './support/targets.js';

interface PurgeCase {
  name: string;
  fixture: string | null;
  /** SQL run before the fill, for a case without a fixture. */
  setup?: string;
  targets: unknown[];
  fills: Fill[];
  /** The system's own revocation of the rows whose keys are in $1 (text[]). */
  revoke: { table: string; sql: string }[];
}

const UTC_NOW = `(now() AT TIME ZONE 'UTC')`;

const CASES: PurgeCase[] = [
  {
    name: 'laravel-passport',
    fixture: 'laravel-passport.sql',
    targets: [{ preset: 'laravel-passport' }],
    fills: ['oauth_access_tokens', 'oauth_refresh_tokens'].map((table) => ({
      table,
      values: { revoked: 'false', expires_at: `${UTC_NOW} + interval '1 year'` },
      rows: 100,
    })),
    // league/oauth2-server through Passport's repositories: UPDATE … SET revoked = true.
    revoke: [
      {
        table: 'public.oauth_access_tokens',
        sql: `UPDATE oauth_access_tokens SET revoked = true, updated_at = ${UTC_NOW} WHERE id = ANY($1::text[])`,
      },
      {
        table: 'public.oauth_refresh_tokens',
        sql: 'UPDATE oauth_refresh_tokens SET revoked = true WHERE id = ANY($1::text[])',
      },
    ],
  },
  {
    name: 'doorkeeper',
    fixture: 'doorkeeper.sql',
    targets: [{ preset: 'doorkeeper' }],
    fills: [
      {
        table: 'oauth_access_tokens',
        values: {
          created_at: UTC_NOW,
          expires_in: '7200',
          refresh_token: 'md5(random()::text || g)',
        },
        rows: 100,
      },
    ],
    // Revocable#revoke: update_attribute(:revoked_at, Time.now.utc).
    revoke: [
      {
        table: 'public.oauth_access_tokens',
        sql: `UPDATE oauth_access_tokens SET revoked_at = ${UTC_NOW} WHERE id::text = ANY($1::text[])`,
      },
    ],
  },
  {
    name: 'django-oauth-toolkit, with no grace',
    fixture: 'django-oauth-toolkit.sql',
    // The refresh tokens with the grace set to none, so the revocation is purged at once: its
    // delete unlinks the access tokens that came from it (the keys are DEFERRABLE, no ON DELETE).
    targets: [
      {
        preset: 'django-oauth-toolkit',
        only: ['oauth2_provider_refreshtoken'],
        marker: { grace: '0 seconds' },
      },
    ],
    fills: [
      { table: 'oauth2_provider_refreshtoken', values: {}, rows: 100 },
      {
        table: 'oauth2_provider_accesstoken',
        values: {
          expires: `now() + interval '10 hours'`,
          source_refresh_token_id: '(SELECT id FROM oauth2_provider_refreshtoken WHERE id = g)',
        },
        rows: 100,
      },
    ],
    // RefreshToken.revoke(): access_token_id = NULL, revoked = timezone.now().
    revoke: [
      {
        table: 'public.oauth2_provider_refreshtoken',
        sql: `UPDATE oauth2_provider_refreshtoken SET revoked = now(), access_token_id = NULL
              WHERE id::text = ANY($1::text[])`,
      },
    ],
  },
  {
    name: 'a bigint id past 2^53',
    fixture: null,
    setup: `CREATE TABLE big_tokens (id bigint PRIMARY KEY, revoked boolean NOT NULL DEFAULT false,
                                     expires_at timestamptz NOT NULL)`,
    targets: [
      { table: 'big_tokens', marker: { column: 'revoked' }, expiry: { column: 'expires_at' } },
    ],
    // 2^53 + 1 and its neighbours: a JSON number would round them onto each other.
    fills: [
      {
        table: 'big_tokens',
        values: { id: '9007199254740992 + g', expires_at: `now() + interval '1 day'` },
        rows: 40,
      },
    ],
    revoke: [
      {
        table: 'public.big_tokens',
        sql: 'UPDATE big_tokens SET revoked = true WHERE id::text = ANY($1::text[])',
      },
    ],
  },
];

const SOURCES = ['notify', 'wal', 'poll'] as const;

/** The log lines that follow a daemon's start once a revocation can only go by the prompt path. */
const READY_EVENT = {
  notify: 'listener.caught_up',
  wal: 'wal.connected',
  poll: 'listener.caught_up',
};

describe('the prompt purge on the systems’ schemas', function () {
  this.timeout(120_000);
  const logicalServer = useLogicalServer();

  for (const source of SOURCES) {
    for (const testCase of CASES) describePresetPurge(testCase, source, logicalServer);
  }
});

function describePresetPurge(
  testCase: PurgeCase,
  source: (typeof SOURCES)[number],
  logicalServer: () => string,
) {
  describe(`${testCase.name}, PURGE_SOURCE=${source}`, () => {
    const database = useTestDatabase(`purge ${source} ${testCase.name}`, {
      ...(source === 'wal' ? { server: logicalServer } : {}),
    });
    let client: pg.Client;

    before(async () => {
      client = await openAuthDatabase(database, {
        ...(testCase.fixture === null ? {} : { fixture: testCase.fixture }),
        ...(testCase.setup === undefined ? {} : { sql: testCase.setup }),
        fills: testCase.fills,
      });
    });
    after(() => client.end());

    it('deletes exactly the rows the system revokes with its own UPDATE, promptly', async () => {
      const file = await writeTargetsFile({ targets: testCase.targets });
      const environment = {
        DATABASE_URL: database.url,
        NAIVE_TIMESTAMPS_TIMEZONE: 'UTC',
        NODE_ENV: 'test',
        PURGE_SOURCE: source,
        // Slots are the server's, not the database's: one of its own for each database.
        PURGE_WAL_SLOT: database.name,
        PURGE_POLL_INTERVAL_MS: '50',
      };
      try {
        const install = await runCli(['install', '--config', file.path], environment);
        expect(install.code, install.stderr + install.stdout).to.equal(0);
        const running = spawnDaemon(['start', '--config', file.path], environment);
        try {
          // Every table's first catch-up over (wal has none: the slot starts at install): a
          // row revoked while its table's runs may go by either path.
          const started = await running.waitForLog('daemon.started');
          const prompt = (started.targets as { notify: boolean }[]).filter((t) => t.notify);
          const ready = READY_EVENT[source];
          await waitFor(
            () =>
              running.logs.filter((line) => line.event === ready).length >=
              (source === 'wal' ? 1 : prompt.length),
            { message: `${ready} for every table` },
          );
          const since = running.logs.length;
          const tables = testCase.revoke.map((revocation) => revocation.table);
          const before = await rowKeys(client, tables);
          const revoked = new Map<string, string[]>();
          for (const revocation of testCase.revoke) {
            const keys = before.get(revocation.table)!.filter(() => Math.random() < 0.3);
            revoked.set(revocation.table, keys);
            // One by one, as the auth service revokes on each refresh.
            for (const key of keys) await client.query(revocation.sql, [[key]]);
          }
          await waitFor(
            async () => {
              const now = await rowKeys(client, tables);
              return tables.every((table) =>
                revoked.get(table)!.every((key) => !now.get(table)!.includes(key)),
              );
            },
            { message: 'every revoked row purged' },
          );
          const after = await rowKeys(client, tables);
          for (const table of tables) {
            const gone = new Set(revoked.get(table));
            expect(after.get(table), table).to.deep.equal(
              before.get(table)!.filter((key) => !gone.has(key)),
            );
          }
          // A row is gone when its DELETE commits; its log line may still be on the way. Each
          // went by the prompt path (a poll, for poll), or by a catch-up that retried a batch
          // (one that met a lock or failed).
          const purged = () =>
            running.logs
              .slice(since)
              .filter((line) =>
                ['purge.batch', 'listener.caught_up', 'purge.polled'].includes(line.event),
              )
              .reduce((sum, line) => sum + (line.deleted as number), 0);
          const expected = [...revoked.values()].flat().length;
          await waitFor(() => purged() >= expected, {
            message: 'a purge.batch line per revocation',
          }).catch((error: Error) => {
            throw new Error(`${error.message}\n${running.describeOutput()}`, { cause: error });
          });
          expect(purged(), running.describeOutput()).to.equal(expected);
          expect(
            running.logs.filter((line) => line.event === 'listener.bad_payload'),
          ).to.deep.equal([]);
          running.signal('SIGTERM');
          expect((await running.exited).code, running.describeOutput()).to.equal(0);
          // uninstall drops the slot, which would otherwise keep the database from being dropped.
          const uninstall = await runCli(['uninstall', '--config', file.path], environment);
          expect(uninstall.code, uninstall.stderr + uninstall.stdout).to.equal(0);
        } finally {
          await running.kill();
        }
      } finally {
        await file.remove();
      }
    });
  });
}
