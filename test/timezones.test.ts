// Time is never read in the session's zone. Randomised rows expire within two hours either side
// of now, in every column type token-reaper reads time from, on databases whose TimeZone is
// +14 and −11 hours from UTC, with the process's TZ different again. Every path (dry run,
// catch-up, prompt purge, sweep, partition drops) must delete exactly the rows that are dead
// on the database clock, and no live one.
import { expect } from 'chai';
import pg from 'pg';
import { createPurger } from '../src/purge/purger.js';
import { createNotificationRouter } from '../src/purge/router.js';
import { useTestDatabase } from './support/database.js';
import { runCli, waitFor } from './support/cli.js';
import { finishedSweep, targetsHarness, writeTargetsFile } from './support/targets.js';

interface ColumnCase {
  name: string;
  /** The SQL type of expires_at (and of revoked_at, unless epoch). */
  type: string;
  /** The zone the application writes a naive column in; null for an instant or epoch. */
  zone: string | null;
  epoch?: boolean;
}

const CASES: ColumnCase[] = [
  { name: 'tz', type: 'timestamptz', zone: null },
  { name: 'tz3', type: 'timestamptz(3)', zone: null },
  { name: 'naive', type: 'timestamp', zone: 'UTC' },
  { name: 'naive0', type: 'timestamp(0)', zone: 'UTC' },
  { name: 'naive3', type: 'timestamp(3)', zone: 'UTC' },
  { name: 'la', type: 'timestamp', zone: 'America/Los_Angeles' },
  { name: 'la3', type: 'timestamp(3)', zone: 'America/Los_Angeles' },
  { name: 'epoch', type: 'bigint', zone: null, epoch: true },
];

const ROWS = 300;

/** Seconds from now, 2 minutes to 2 hours away either side: no row changes kind mid-test. */
function randomOffset() {
  const magnitude = 120 + Math.floor(Math.random() * 7080);
  return Math.random() < 0.5 ? -magnitude : magnitude;
}

/** How the application writes "now + offset" into a column of this case. */
function written(column: ColumnCase, offset: string) {
  if (column.epoch) return `(extract(epoch FROM now())::bigint + ${offset})`;
  if (column.zone === null) return `(now() + make_interval(secs => ${offset}))`;
  return `((now() AT TIME ZONE '${column.zone}') + make_interval(secs => ${offset}))`;
}

interface Row {
  id: number;
  expires: number;
  revoked: number | null;
}

function dead(row: Row) {
  return row.expires < 0 || (row.revoked !== null && row.revoked < 0);
}
function revokedDead(row: Row) {
  return row.revoked !== null && row.revoked < 0;
}

function makeRows(first: number, count: number, revokedShare = 0.4): Row[] {
  return Array.from({ length: count }, (_, index) => ({
    id: first + index,
    expires: randomOffset(),
    revoked: Math.random() < revokedShare ? randomOffset() : null,
  }));
}

async function insertRows(
  client: pg.Client,
  column: ColumnCase,
  rows: readonly Row[],
  table = `tz_${column.name}`,
) {
  const revokedValue = column.epoch
    ? 'rows.revoked IS NOT NULL AND rows.revoked < 0'
    : `CASE WHEN rows.revoked IS NULL THEN NULL ELSE ${written(column, 'rows.revoked')} END`;
  await client.query(
    `INSERT INTO ${table} (id, ${column.epoch ? 'revoked' : 'revoked_at'}, expires_at)
     SELECT rows.id, ${revokedValue}, ${written(column, 'rows.expires')}
     FROM unnest($1::bigint[], $2::int[], $3::int[]) AS rows (id, expires, revoked)`,
    [rows.map((row) => row.id), rows.map((row) => row.expires), rows.map((row) => row.revoked)],
  );
}

function target(column: ColumnCase) {
  return {
    table: `tz_${column.name}`,
    marker: { column: column.epoch ? 'revoked' : 'revoked_at' },
    expiry: column.epoch ? { column: 'expires_at', unit: 'seconds' } : { column: 'expires_at' },
    // UTC comes from NAIVE_TIMESTAMPS_TIMEZONE; Los Angeles is this target's own.
    ...(column.zone !== null && column.zone !== 'UTC' ? { timezone: column.zone } : {}),
  };
}

async function remainingIds(client: pg.Client, column: ColumnCase) {
  const result = await client.query<{ id: string }>(`SELECT id FROM tz_${column.name}`);
  return new Set(result.rows.map((row) => Number(row.id)));
}

for (const databaseZone of ['Pacific/Kiritimati', 'Pacific/Pago_Pago']) {
  describe(`time zones: a database whose TimeZone is ${databaseZone}`, () => {
    const database = useTestDatabase('timezones');
    let client: pg.Client;
    const processZone = process.env.TZ;

    before(async () => {
      await database.query(`ALTER DATABASE ${database.name} SET timezone = '${databaseZone}'`);
      client = new pg.Client({ connectionString: database.url });
      // The block's database is dropped (its sessions terminated) before this client ends.
      client.on('error', () => undefined);
      await client.connect();
      const zone = await client.query<{ TimeZone: string }>('SHOW timezone');
      expect(zone.rows[0]!.TimeZone).to.equal(databaseZone);
      // The process's own zone is another one again: nothing may read it either.
      process.env.TZ = 'Asia/Kathmandu';
    });
    after(async () => {
      if (processZone === undefined) delete process.env.TZ;
      else process.env.TZ = processZone;
      await client.end();
    });

    beforeEach(async () => {
      for (const column of CASES) {
        await client.query(`DROP TABLE IF EXISTS tz_${column.name}`);
        await client.query(
          `CREATE TABLE tz_${column.name} (
             id bigint PRIMARY KEY,
             ${column.epoch ? 'revoked boolean' : `revoked_at ${column.type}`},
             expires_at ${column.type} NOT NULL)`,
        );
      }
    });

    /** ROWS random rows in the table of every column type, by type. */
    async function fillEveryType() {
      const rows = new Map<string, Row[]>();
      for (const column of CASES) {
        rows.set(column.name, makeRows(1, ROWS));
        await insertRows(client, column, rows.get(column.name)!);
      }
      return rows;
    }

    it('a dry run counts, and a sweep deletes, exactly the dead rows of every column type', async () => {
      const rows = await fillEveryType();
      const harness = await targetsHarness(database.url, CASES.map(target), {
        NAIVE_TIMESTAMPS_TIMEZONE: 'UTC',
      });
      try {
        const dryRun = finishedSweep(await harness.sweeper.sweep('cli', { dryRun: true }));
        for (const column of CASES) {
          expect(dryRun.tables[`public.tz_${column.name}`]!.wouldDelete, column.name).to.equal(
            rows.get(column.name)!.filter(dead).length,
          );
        }
        finishedSweep(await harness.sweeper.sweep('cli'));
        for (const column of CASES) {
          const live = rows.get(column.name)!.filter((row) => !dead(row));
          expect([...(await remainingIds(client, column))].sort(), column.name).to.deep.equal(
            live.map((row) => row.id).sort(),
          );
        }
      } finally {
        await harness.close();
      }
    });

    it('the catch-up and the prompt purge delete exactly the revoked rows that are dead', async () => {
      const rows = await fillEveryType();
      const harness = await targetsHarness(database.url, CASES.map(target), {
        NAIVE_TIMESTAMPS_TIMEZONE: 'UTC',
      });
      const shapes = await harness.shapes();
      const purgers = shapes.map((shape) =>
        createPurger({
          pool: harness.pool,
          shape,
          config: harness.config,
          logger: harness.logs.logger,
          events: harness.events,
        }),
      );
      try {
        await Promise.all(purgers.map((purger) => purger.catchUp('connected')));
        for (const column of CASES) {
          const kept = rows.get(column.name)!.filter((row) => !revokedDead(row));
          expect([...(await remainingIds(client, column))].sort(), column.name).to.deep.equal(
            kept.map((row) => row.id).sort(),
          );
        }

        // New rows, each named in a NOTIFY-style payload: the purge re-checks the rule, so only
        // the rows whose revocation time has passed on the database clock go.
        let sent = 0;
        let purged = 0;
        harness.events.on('purge', (batch) => (purged += batch.ids));
        const fresh = new Map<string, Row[]>();
        const router = createNotificationRouter(purgers, harness.logs.logger);
        for (const column of CASES) {
          const added = makeRows(ROWS + 1, 100, 1);
          fresh.set(column.name, added);
          await insertRows(client, column, added);
          for (const row of added) {
            const payload = {
              table: `public.tz_${column.name}`,
              id: String(row.id),
              revoked_at: new Date().toISOString(),
            };
            router.route(JSON.stringify(payload));
            sent += 1;
          }
        }
        await waitFor(() => purged === sent, { message: 'every payload purged' });
        router.stop();
        for (const column of CASES) {
          const kept = [
            ...rows.get(column.name)!.filter((row) => !revokedDead(row)),
            ...fresh.get(column.name)!.filter((row) => !revokedDead(row)),
          ];
          expect([...(await remainingIds(client, column))].sort(), column.name).to.deep.equal(
            kept.map((row) => row.id).sort(),
          );
        }
      } finally {
        await Promise.all(purgers.map((purger) => purger.stop()));
        await harness.close();
      }
    });

    it('drops the partitions of a naive expiry only once they are past in the declared zone', async () => {
      // Daily partitions on Los Angeles wall-clock days, from three days back to three ahead.
      await client.query(`DROP TABLE IF EXISTS la_parted`);
      await client.query(
        `CREATE TABLE la_parted (id bigint NOT NULL, revoked_at timestamp, expires_at timestamp NOT NULL)
         PARTITION BY RANGE (expires_at)`,
      );
      const days = await client.query<{ name: string; lower: string; upper: string }>(
        `SELECT 'la_parted_d' || (d + 3) AS name,
                to_char(day, 'YYYY-MM-DD HH24:MI:SS') AS lower,
                to_char(day + interval '1 day', 'YYYY-MM-DD HH24:MI:SS') AS upper
         FROM generate_series(-3, 3) d,
              LATERAL (SELECT date_trunc('day', now() AT TIME ZONE 'America/Los_Angeles')
                              + make_interval(days => d) AS day) bound`,
      );
      for (const day of days.rows) {
        await client.query(
          `CREATE TABLE ${day.name} PARTITION OF la_parted FOR VALUES FROM ('${day.lower}') TO ('${day.upper}')`,
        );
      }
      const column: ColumnCase = { name: 'la', type: 'timestamp', zone: 'America/Los_Angeles' };
      const rows = makeRows(1, ROWS);
      // Rows from the days that are wholly past, too: they go with their partitions.
      const old = Array.from({ length: 50 }, (_, index) => ({
        id: ROWS + 1 + index,
        expires: -(86_400 + Math.floor(Math.random() * 86_400)),
        revoked: null,
      }));
      await insertRows(client, column, [...rows, ...old], 'la_parted');
      const expectedDrops = await client.query<{ count: string }>(
        `SELECT count(*) FROM generate_series(-3, 3) d
         WHERE date_trunc('day', now() AT TIME ZONE 'America/Los_Angeles') + make_interval(days => d + 1)
               <= now() AT TIME ZONE 'America/Los_Angeles'`,
      );
      const harness = await targetsHarness(database.url, [
        {
          table: 'la_parted',
          id: 'id',
          marker: { column: 'revoked_at' },
          expiry: { column: 'expires_at' },
          timezone: 'America/Los_Angeles',
        },
      ]);
      try {
        const outcome = finishedSweep(await harness.sweeper.sweep('cli'));
        const table = outcome.tables['public.la_parted']!;
        expect(table.partitionsDropped).to.equal(Number(expectedDrops.rows[0]!.count));
        const remaining = await client.query<{ id: string }>('SELECT id FROM la_parted');
        expect(remaining.rows.map((row) => Number(row.id)).sort()).to.deep.equal(
          rows
            .filter((row) => !dead(row))
            .map((row) => row.id)
            .sort(),
        );
        // The partitions made ahead continue the Los Angeles grid, without a gap.
        const gaps = await client.query<{ gaps: string }>(
          `WITH bounds AS (
             SELECT substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \\(''(.*)''\\) TO')::timestamp AS lower,
                    substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \\(''(.*)''\\)')::timestamp AS upper
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'la_parted'::regclass)
           SELECT count(*) AS gaps FROM bounds b
           WHERE b.upper < (SELECT max(upper) FROM bounds)
             AND NOT EXISTS (SELECT 1 FROM bounds n WHERE n.lower = b.upper)`,
        );
        expect(Number(gaps.rows[0]!.gaps)).to.equal(0);
      } finally {
        await harness.close();
      }
    });

    it('converts a plain table with a naive expiry to partitions on the declared zone, then sweeps it', async () => {
      await client.query(`DROP TABLE IF EXISTS la_plain`);
      await client.query(
        `CREATE TABLE la_plain (id bigint PRIMARY KEY, revoked_at timestamp, expires_at timestamp NOT NULL)`,
      );
      const column: ColumnCase = { name: 'la', type: 'timestamp', zone: 'America/Los_Angeles' };
      // Enough rows for more than 128 pages, so that the conversion proves the bound with a
      // CHECK written in the column's own wall-clock time; and a row that expired forever ago.
      const rows = makeRows(1, 30_000);
      await insertRows(client, column, rows, 'la_plain');
      await client.query(`INSERT INTO la_plain VALUES (40001, NULL, '-infinity')`);
      const targets = [
        {
          table: 'la_plain',
          marker: { column: 'revoked_at' },
          expiry: { column: 'expires_at' },
          timezone: 'America/Los_Angeles',
        },
      ];
      const file = await writeTargetsFile({ targets });
      try {
        const conversion = await runCli(['partition', 'convert', '--config', file.path], {
          DATABASE_URL: database.url,
        });
        expect(conversion.code, conversion.stderr + conversion.stdout).to.equal(0);
      } finally {
        await file.remove();
      }
      const count = await client.query<{ n: string }>('SELECT count(*) AS n FROM la_plain');
      expect(Number(count.rows[0]!.n)).to.equal(rows.length + 1);
      // The legacy partition ends at a UTC midnight, written as Los Angeles wall-clock time.
      const bound = await client.query<{ matches: boolean }>(
        `SELECT ((substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \\(''(.*)''\\)')::timestamp
                  AT TIME ZONE 'America/Los_Angeles') AT TIME ZONE 'UTC')::time = '00:00' AS matches
         FROM pg_class c WHERE c.relname = 'la_plain_legacy'`,
      );
      expect(bound.rows[0]!.matches).to.equal(true);

      const harness = await targetsHarness(database.url, targets);
      try {
        const outcome = finishedSweep(await harness.sweeper.sweep('cli'));
        expect(outcome.tables['public.la_plain']!.partitions).to.not.equal(undefined);
      } finally {
        await harness.close();
      }
      const remaining = await client.query<{ id: string }>('SELECT id FROM la_plain');
      expect(remaining.rows.map((row) => Number(row.id)).sort((a, b) => a - b)).to.deep.equal([
        ...rows
          .filter((row) => !dead(row))
          .map((row) => row.id)
          .sort((a, b) => a - b),
      ]);
    });
  });
}
