// Odd expiries on a real PostgreSQL whose TimeZone is Asia/Tokyo: 'infinity' never expires,
// '-infinity' has always expired, years 1 and 9999 are instants like any other, and an epoch
// column says "never" with an integer's extremes. Every path (the sweep of a plain and of a
// partitioned table, the partitions made ahead, partition convert, explain) must go on as if
// they were ordinary rows: each dead one goes, each live one stays, and nothing fails.
import { expect } from 'chai';
import pg from 'pg';
import { runCli, type CliResult } from './support/cli.js';
import { useTestDatabase } from './support/database.js';
import { finishedSweep, targetsHarness, writeTargetsFile } from './support/targets.js';

interface ColumnCase {
  name: string;
  /** The SQL type of expires_at. */
  type: string;
  /** The zone the application writes a naive column in; null for an instant or epoch. */
  zone: string | null;
  epoch?: 'seconds' | 'milliseconds';
}

const TIMESTAMP_CASES: ColumnCase[] = [
  { name: 'tz', type: 'timestamptz', zone: null },
  { name: 'naive', type: 'timestamp', zone: 'America/Los_Angeles' },
];
const EPOCH_CASES: ColumnCase[] = [
  { name: 'epoch_s', type: 'bigint', zone: null, epoch: 'seconds' },
  { name: 'epoch_ms', type: 'bigint', zone: null, epoch: 'milliseconds' },
];
const DATABASE_ZONE = 'Asia/Tokyo';
/** Ordinary rows expire at most this far from now, and at least an hour away. */
const ORDINARY_SPREAD_SECONDS = 2 * 86_400;

interface Row {
  id: number;
  revoked: boolean;
  dead: boolean;
}
interface OddRow extends Row {
  /** The value as text in the column's type. */
  value: string;
  /** Expires beyond any partition made ahead: it belongs in the default partition. */
  farFuture: boolean;
}
interface OrdinaryRow extends Row {
  /** Seconds from now. */
  seconds: number;
}

/** How each column type says never, always, year 1 and year 9999. */
function oddValues(column: ColumnCase) {
  switch (column.epoch) {
    case undefined:
      return {
        never: 'infinity',
        always: '-infinity',
        yearOne: '0001-01-01 00:00:00',
        year9999: '9999-12-31 23:59:59',
      };
    case 'seconds':
      return {
        never: '9223372036854775807',
        always: '-9223372036854775808',
        yearOne: '-62135596800',
        year9999: '253402300799',
      };
    case 'milliseconds':
      return {
        never: '9223372036854775807',
        always: '-9223372036854775808',
        yearOne: '-62135596800000',
        year9999: '253402300799999',
      };
  }
}

function oddRows(column: ColumnCase): OddRow[] {
  const values = oddValues(column);
  const row = (id: number, value: string, revoked: boolean, dead: boolean, farFuture: boolean) => ({
    id,
    value,
    revoked,
    dead,
    farFuture,
  });
  return [
    row(1, values.never, false, false, true),
    row(2, values.always, false, true, false),
    row(3, values.yearOne, false, true, false),
    row(4, values.year9999, false, false, true),
    // A revoked row is dead whenever it expires.
    row(5, values.never, true, true, true),
    row(6, values.year9999, true, true, true),
    row(7, values.always, true, true, false),
  ];
}

/** `count` rows from id `first` on, an hour to ORDINARY_SPREAD_SECONDS either side of now. */
function ordinaryRows(first: number, count: number): OrdinaryRow[] {
  return Array.from({ length: count }, (_, index) => {
    const magnitude = 3_600 + Math.floor(Math.random() * (ORDINARY_SPREAD_SECONDS - 7_200));
    const seconds = Math.random() < 0.5 ? -magnitude : magnitude;
    const revoked = Math.random() < 0.2;
    return { id: first + index, seconds, revoked, dead: revoked || seconds < 0 };
  });
}

/** How the application writes "now + seconds" into a column of this case. */
function written(column: ColumnCase, seconds: string) {
  switch (column.epoch) {
    case 'seconds':
      return `(extract(epoch FROM now())::bigint + ${seconds})`;
    case 'milliseconds':
      return `((extract(epoch FROM now()) * 1000)::bigint + ${seconds} * 1000)`;
    case undefined:
      return column.zone === null
        ? `(now() + make_interval(secs => ${seconds}))`
        : `((now() AT TIME ZONE '${column.zone}') + make_interval(secs => ${seconds}))`;
  }
}

/** A UTC midnight `days` from today's, in the column's type. */
function utcMidnight(column: ColumnCase, days: string) {
  const instant = `((date_trunc('day', now() AT TIME ZONE 'UTC') + make_interval(days => ${days})) AT TIME ZONE 'UTC')`;
  return column.zone === null ? instant : `(${instant} AT TIME ZONE '${column.zone}')`;
}

function target(column: ColumnCase, table: string) {
  return {
    table,
    id: 'id',
    marker: { column: 'revoked' },
    expiry: column.epoch ? { column: 'expires_at', unit: column.epoch } : { column: 'expires_at' },
    ...(column.zone === null ? {} : { timezone: column.zone }),
  };
}

function liveIds(rows: readonly Row[]) {
  return rows
    .filter((row) => !row.dead)
    .map((row) => row.id)
    .sort((a, b) => a - b);
}

function succeeded(result: CliResult) {
  expect(result.code, `${result.stderr}\n${result.stdout}`).to.equal(0);
  return result;
}

interface Explanation {
  targets: { table: string; counts: { rows: number; dead: number } }[];
  problems: string[];
}

describe(`infinite and extreme expiries, on a database whose TimeZone is ${DATABASE_ZONE}`, () => {
  const database = useTestDatabase('infinity');
  let client: pg.Client;

  before(async () => {
    await database.query(`ALTER DATABASE ${database.name} SET timezone = '${DATABASE_ZONE}'`);
    client = new pg.Client({ connectionString: database.url });
    // The block's database is dropped (its sessions terminated) before this client ends.
    client.on('error', () => undefined);
    await client.connect();
    const zone = await client.query<{ TimeZone: string }>('SHOW timezone');
    expect(zone.rows[0]!.TimeZone).to.equal(DATABASE_ZONE);
  });
  after(async () => {
    await client.end();
  });

  async function insertOddRows(table: string, column: ColumnCase, rows: readonly OddRow[]) {
    await client.query(
      `INSERT INTO ${table} (id, revoked, expires_at)
       SELECT rows.id, rows.revoked, rows.value::${column.type}
       FROM unnest($1::bigint[], $2::boolean[], $3::text[]) AS rows (id, revoked, value)`,
      [rows.map((row) => row.id), rows.map((row) => row.revoked), rows.map((row) => row.value)],
    );
  }

  async function insertOrdinaryRows(
    table: string,
    column: ColumnCase,
    rows: readonly OrdinaryRow[],
  ) {
    await client.query(
      `INSERT INTO ${table} (id, revoked, expires_at)
       SELECT rows.id, rows.revoked, ${written(column, 'rows.seconds')}
       FROM unnest($1::bigint[], $2::boolean[], $3::int[]) AS rows (id, revoked, seconds)`,
      [rows.map((row) => row.id), rows.map((row) => row.revoked), rows.map((row) => row.seconds)],
    );
  }

  async function createPlainTable(table: string, column: ColumnCase) {
    await client.query(
      `CREATE TABLE ${table} (id bigint PRIMARY KEY, revoked boolean NOT NULL DEFAULT false,
                              expires_at ${column.type} NOT NULL)`,
    );
  }

  /** Daily partitions on UTC days from three days back to three ahead, and a default one. */
  async function createPartitionedTable(table: string, column: ColumnCase) {
    await client.query(
      `CREATE TABLE ${table} (id bigint NOT NULL, revoked boolean NOT NULL DEFAULT false,
                              expires_at ${column.type} NOT NULL, PRIMARY KEY (id, expires_at))
       PARTITION BY RANGE (expires_at)`,
    );
    const days = await client.query<{ day: number; lower: string; upper: string }>(
      `SELECT d AS day, ${utcMidnight(column, 'd')}::text AS lower,
              ${utcMidnight(column, 'd + 1')}::text AS upper
       FROM generate_series(-3, 3) d`,
    );
    for (const day of days.rows) {
      await client.query(
        `CREATE TABLE ${table}_day${day.day + 3} PARTITION OF ${table}
         FOR VALUES FROM ('${day.lower}') TO ('${day.upper}')`,
      );
    }
    await client.query(`CREATE TABLE ${table}_default PARTITION OF ${table} DEFAULT`);
  }

  async function remainingIds(table: string) {
    const result = await client.query<{ id: string }>(`SELECT id FROM ${table}`);
    return result.rows.map((row) => Number(row.id)).sort((a, b) => a - b);
  }

  /** `token-reaper explain --json` on the targets, which must succeed and count right. */
  async function explainCounts(targets: unknown, expected: Record<string, readonly Row[]>) {
    const file = await writeTargetsFile({ targets });
    try {
      const result = succeeded(
        await runCli(['explain', '--json', '--config', file.path], { DATABASE_URL: database.url }),
      );
      const explanation = JSON.parse(result.stdout) as Explanation;
      expect(explanation.problems).to.deep.equal([]);
      for (const [table, rows] of Object.entries(expected)) {
        const explained = explanation.targets.find((entry) => entry.table === `public.${table}`);
        expect(explained?.counts, table).to.deep.include({
          rows: rows.length,
          dead: rows.filter((row) => row.dead).length,
        });
      }
    } finally {
      await file.remove();
    }
  }

  it('explains, counts and sweeps a plain table of every column type: exactly the dead rows go', async () => {
    const columns = [...TIMESTAMP_CASES, ...EPOCH_CASES];
    const rows = new Map<string, Row[]>();
    for (const column of columns) {
      const table = `plain_${column.name}`;
      const odd = oddRows(column);
      const ordinary = ordinaryRows(100, 300);
      await createPlainTable(table, column);
      await insertOddRows(table, column, odd);
      await insertOrdinaryRows(table, column, ordinary);
      rows.set(table, [...odd, ...ordinary]);
    }
    const targets = columns.map((column) => target(column, `plain_${column.name}`));
    await explainCounts(targets, Object.fromEntries(rows));

    const harness = await targetsHarness(database.url, targets);
    try {
      const dryRun = finishedSweep(await harness.sweeper.sweep('cli', { dryRun: true }));
      for (const [table, tableRows] of rows) {
        expect(dryRun.tables[`public.${table}`]!.wouldDelete, table).to.equal(
          tableRows.filter((row) => row.dead).length,
        );
      }
      finishedSweep(await harness.sweeper.sweep('cli'));
    } finally {
      await harness.close();
    }
    for (const [table, tableRows] of rows) {
      expect(await remainingIds(table), table).to.deep.equal(liveIds(tableRows));
    }
  });

  it('sweeps a table partitioned by expiry as if its odd rows were not there, and warns about those in the default partition', async () => {
    const rows = new Map<string, Row[]>();
    const targets = [];
    for (const column of TIMESTAMP_CASES) {
      const ordinary = ordinaryRows(100, 1_000);
      const odd = oddRows(column);
      // The same ordinary rows in a control table without the odd ones, written in the same
      // transaction (the same now()), so that both have the same longest token lifetime.
      await createPartitionedTable(`parted_${column.name}`, column);
      await createPartitionedTable(`control_${column.name}`, column);
      await client.query('BEGIN');
      await insertOddRows(`parted_${column.name}`, column, odd);
      await insertOrdinaryRows(`parted_${column.name}`, column, ordinary);
      await insertOrdinaryRows(`control_${column.name}`, column, ordinary);
      await client.query('COMMIT');
      rows.set(`parted_${column.name}`, [...odd, ...ordinary]);
      rows.set(`control_${column.name}`, ordinary);
      targets.push(
        target(column, `parted_${column.name}`),
        target(column, `control_${column.name}`),
      );
    }
    await explainCounts(targets, Object.fromEntries(rows));

    const harness = await targetsHarness(database.url, targets);
    let outcome: ReturnType<typeof finishedSweep>;
    try {
      outcome = finishedSweep(await harness.sweeper.sweep('cli'));
    } finally {
      await harness.close();
    }
    for (const [table, tableRows] of rows) {
      expect(await remainingIds(table), table).to.deep.equal(liveIds(tableRows));
    }
    expect(harness.logs.events('sweep.partition_create_failed')).to.deep.equal([]);
    const days = (names: readonly string[]) => names.map((name) => name.replace(/^.*_p/, ''));
    for (const column of TIMESTAMP_CASES) {
      const parted = outcome.tables[`public.parted_${column.name}`]!;
      const control = outcome.tables[`public.control_${column.name}`]!;
      // The days three, two and one back have passed whole.
      expect(parted.partitionsDropped, column.name).to.equal(3);
      expect(control.partitionsDropped, column.name).to.equal(3);
      // Made ahead for the longest ordinary lifetime (two days) plus the margin, past the
      // three days that exist: never up to year 9999.
      const made = days(parted.partitions!.partitionsCreated);
      expect(made, column.name).to.have.length.within(4, 8);
      expect(made, column.name).to.deep.equal(days(control.partitions!.partitionsCreated));

      const farFuture = oddRows(column).filter((row) => row.farFuture && !row.dead).length;
      expect(parted.partitions!.rowsInDefaultPartition, column.name).to.equal(farFuture);
      expect(control.partitions!.rowsInDefaultPartition, column.name).to.equal(0);
      const warnings = harness.logs
        .events('sweep.default_partition_rows')
        .filter((line) => line['table'] === `public.parted_${column.name}`);
      expect(warnings, column.name).to.have.length(1);
      expect(warnings[0]).to.include({ rows: farFuture, rowsBeyondHorizon: farFuture });
    }
    expect(
      harness.logs
        .events('sweep.default_partition_rows')
        .filter((line) => String(line['table']).startsWith('public.control_')),
    ).to.deep.equal([]);
  });

  it('sweeps partitions bounded by -infinity and infinity: drops the one from -infinity, keeps making days ahead', async () => {
    const rows = new Map<string, Row[]>();
    for (const column of TIMESTAMP_CASES) {
      const table = `bounded_${column.name}`;
      await client.query(
        `CREATE TABLE ${table} (id bigint NOT NULL, revoked boolean NOT NULL DEFAULT false,
                                expires_at ${column.type} NOT NULL, PRIMARY KEY (id, expires_at))
         PARTITION BY RANGE (expires_at)`,
      );
      // Everything before yesterday in one partition, yesterday, today and tomorrow in one
      // partition two days wide, 'infinity' on its own, and the default partition for the
      // rest (year 9999).
      const bounds = await client.query<{ yesterday: string; today: string; later: string }>(
        `SELECT ${utcMidnight(column, '-1')}::text AS yesterday, ${utcMidnight(column, '0')}::text AS today,
                ${utcMidnight(column, '2')}::text AS later`,
      );
      const { yesterday, today, later } = bounds.rows[0]!;
      await client.query(
        `CREATE TABLE ${table}_old PARTITION OF ${table} FOR VALUES FROM ('-infinity') TO ('${yesterday}')`,
      );
      await client.query(
        `CREATE TABLE ${table}_yesterday PARTITION OF ${table} FOR VALUES FROM ('${yesterday}') TO ('${today}')`,
      );
      await client.query(
        `CREATE TABLE ${table}_now PARTITION OF ${table} FOR VALUES FROM ('${today}') TO ('${later}')`,
      );
      await client.query(
        `CREATE TABLE ${table}_never PARTITION OF ${table} FOR VALUES FROM ('infinity') TO (MAXVALUE)`,
      );
      await client.query(`CREATE TABLE ${table}_default PARTITION OF ${table} DEFAULT`);
      const odd = oddRows(column);
      // Ordinary rows from the day before yesterday (in the partition from -infinity) to today.
      const ordinary = ordinaryRows(100, 500).map((row) => ({
        ...row,
        seconds: row.seconds < 0 ? row.seconds - 86_400 : Math.min(row.seconds, 14 * 3_600),
      }));
      await insertOddRows(table, column, odd);
      await insertOrdinaryRows(table, column, ordinary);
      rows.set(table, [...odd, ...ordinary]);
    }
    const targets = TIMESTAMP_CASES.map((column) => target(column, `bounded_${column.name}`));
    await explainCounts(targets, Object.fromEntries(rows));

    const harness = await targetsHarness(database.url, targets);
    let outcome: ReturnType<typeof finishedSweep>;
    try {
      outcome = finishedSweep(await harness.sweeper.sweep('cli'));
    } finally {
      await harness.close();
    }
    expect(harness.logs.events('sweep.partition_create_failed')).to.deep.equal([]);
    for (const column of TIMESTAMP_CASES) {
      const table = `bounded_${column.name}`;
      expect(await remainingIds(table), table).to.deep.equal(liveIds(rows.get(table)!));
      const partitions = await client.query<{ name: string }>(
        `SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = '${table}'::regclass`,
      );
      const names = partitions.rows.map((row) => row.name);
      // The partition from -infinity has passed whole; the one of infinity holds live rows.
      expect(names, table).not.to.include(`${table}_old`);
      expect(names, table).to.include(`${table}_never`);
      const report = outcome.tables[`public.${table}`]!;
      expect(report.partitionsDropped, table).to.equal(2);
      // The grid of the newest bounded partition goes on, two days at a time, from the day
      // after tomorrow up to the horizon (a lifetime under a day, plus 7 days): the partition
      // of infinity is no end of the grid.
      const firstDay = await client.query<{ name: string }>(
        `SELECT to_char(now() AT TIME ZONE 'UTC' + interval '2 days', 'YYYYMMDD') AS name`,
      );
      expect(report.partitions!.partitionsCreated, table).to.have.length(4);
      expect(report.partitions!.partitionsCreated[0], table).to.equal(
        `public.${table}_p${firstDay.rows[0]!.name}`,
      );
    }
  });

  it('partition convert moves infinite and far-off expiries to a default partition, and the sweep takes over', async function () {
    this.timeout(120_000);
    const rows = new Map<string, Row[]>();
    for (const column of TIMESTAMP_CASES) {
      const table = `converted_${column.name}`;
      // More than 128 pages, where the conversion would prove its bound with a CHECK if the
      // odd rows did not keep it from that.
      const ordinary = ordinaryRows(100, 30_000);
      const odd = oddRows(column);
      await createPlainTable(table, column);
      await insertOrdinaryRows(table, column, ordinary);
      await insertOddRows(table, column, odd);
      rows.set(table, [...odd, ...ordinary]);
    }
    const targets = TIMESTAMP_CASES.map((column) => target(column, `converted_${column.name}`));
    const file = await writeTargetsFile({ targets });
    let conversion: CliResult;
    try {
      conversion = succeeded(
        await runCli(
          ['partition', 'convert', '--config', file.path],
          { DATABASE_URL: database.url },
          { timeoutMs: 60_000 },
        ),
      );
    } finally {
      await file.remove();
    }

    for (const column of TIMESTAMP_CASES) {
      const table = `converted_${column.name}`;
      const odd = oddRows(column);
      const warning = conversion.logs.find(
        (line) => line.event === 'partition.warning' && line['table'] === `public.${table}`,
      );
      expect(warning?.message, table).to.include(`public.${table}_default`);
      const converted = conversion.logs.find(
        (line) => line.event === 'partition.converted' && line['table'] === `public.${table}`,
      );
      const created = converted!['partitionsCreated'] as string[];
      expect(created).to.include(`public.${table}_default`);
      // Daily partitions up to the longest ordinary lifetime plus the margin, nowhere near 9999.
      expect(created.length, table).to.be.within(2, 12);

      // Every row is still there, each where it belongs.
      const placed = await client.query<{ id: string; partition: string }>(
        `SELECT id, tableoid::regclass::text AS partition FROM ${table}`,
      );
      expect(placed.rows, table).to.have.length(rows.get(table)!.length);
      const partitionOf = new Map(placed.rows.map((row) => [Number(row.id), row.partition]));
      for (const row of odd) {
        expect(partitionOf.get(row.id), `${table} row ${row.id} (${row.value})`).to.equal(
          row.farFuture ? `${table}_default` : `${table}_legacy`,
        );
      }
      const ordinaryPartitions = new Set(
        placed.rows.filter((row) => Number(row.id) >= 100).map((row) => row.partition),
      );
      expect([...ordinaryPartitions], table).to.deep.equal([`${table}_legacy`]);
    }
    await explainCounts(targets, Object.fromEntries(rows));

    const harness = await targetsHarness(database.url, targets);
    try {
      const outcome = finishedSweep(await harness.sweeper.sweep('cli'));
      for (const column of TIMESTAMP_CASES) {
        const report = outcome.tables[`public.converted_${column.name}`]!;
        // What the conversion made ahead is what the sweep wants: it makes nothing more.
        expect(report.partitions!.partitionsCreated, column.name).to.deep.equal([]);
      }
      expect(harness.logs.events('sweep.partition_create_failed')).to.deep.equal([]);
    } finally {
      await harness.close();
    }
    for (const [table, tableRows] of rows) {
      expect(await remainingIds(table), table).to.deep.equal(liveIds(tableRows));
    }
  });
});
