// What install and uninstall leave in a database, read from the catalog, for the tests of
// PURGE_SOURCE's objects (install-sources.test.ts, uninstall.test.ts); and a walsender that
// holds the slot, as a running daemon under PURGE_SOURCE=wal does.
import { expect } from 'chai';
import pg from 'pg';
import { LogicalReplicationService, PgoutputPlugin } from 'pg-logical-replication';
import { waitFor, type CliResult } from './cli.js';

export interface SourceObjects {
  /** Tables with the revoke trigger (the parent's own, not partitions' clones). */
  readonly triggers: string[];
  readonly triggerFunction: boolean;
  /** The publication's flags, or null when there is none. */
  readonly publication: {
    insert: boolean;
    update: boolean;
    delete: boolean;
    viaRoot: boolean;
  } | null;
  readonly publishedTables: string[];
  /** Slots in this database: `name plugin`. */
  readonly slots: string[];
  readonly schema: boolean;
  /** token-reaper's indexes (…_idx) on tables outside token_reaper. */
  readonly indexes: string[];
}

export async function readSourceObjects(
  pool: pg.Pool,
  slot = 'token_reaper',
): Promise<SourceObjects> {
  const one = async <T>(text: string, parameters: unknown[] = []) =>
    (await pool.query<{ value: T }>(text, parameters)).rows.map((row) => row.value);
  const [publication] = (
    await pool.query(
      `SELECT pubinsert AS insert, pubupdate AS update, pubdelete AS delete, pubviaroot AS "viaRoot"
       FROM pg_publication WHERE pubname = $1`,
      [slot],
    )
  ).rows;
  return {
    triggers: await one<string>(
      `SELECT tgrelid::regclass::text AS value FROM pg_trigger
       WHERE tgname = 'token_reaper_notify_revoked' AND tgparentid = 0 ORDER BY 1`,
    ),
    triggerFunction: (
      await one<boolean>(
        `SELECT to_regprocedure('token_reaper.notify_revoked()') IS NOT NULL AS value`,
      )
    )[0]!,
    publication: (publication as SourceObjects['publication']) ?? null,
    publishedTables: await one<string>(
      `SELECT schemaname || '.' || tablename AS value FROM pg_publication_tables
       WHERE pubname = $1 ORDER BY 1`,
      [slot],
    ),
    slots: await one<string>(
      `SELECT slot_name || ' ' || plugin AS value FROM pg_replication_slots
       WHERE database = current_database() ORDER BY 1`,
    ),
    schema: (await one<boolean>(`SELECT to_regnamespace('token_reaper') IS NOT NULL AS value`))[0]!,
    indexes: await one<string>(
      `SELECT schemaname || '.' || indexname AS value FROM pg_indexes
       WHERE schemaname <> 'token_reaper' AND schemaname NOT LIKE 'pg\\_%'
         AND (indexname LIKE '%\\_expires\\_at\\_idx' OR indexname LIKE '%\\_revoked\\_idx')
       ORDER BY 1`,
    ),
  };
}

/** The `install.finished` (or `uninstall.finished`) line of a run that exited 0. */
export function finished<T>(result: CliResult, event: string): T {
  expect(result.code, result.stderr + result.stdout).to.equal(0);
  const line = result.logs.find((candidate) => candidate.event === event);
  expect(line, result.stdout).not.to.equal(undefined);
  return line as unknown as T;
}

/**
 * Streams from the slot with pgoutput, as the daemon does under PURGE_SOURCE=wal, until the
 * server ends the walsender or stop() is called; resolves once the slot is active.
 */
export async function holdSlot(url: string, pool: pg.Pool, slot = 'token_reaper') {
  const service = new LogicalReplicationService(
    { connectionString: url },
    {
      acknowledge: { auto: true, timeoutSeconds: 10 },
    },
  );
  service.on('error', () => undefined);
  void service
    .subscribe(new PgoutputPlugin({ protoVersion: 1, publicationNames: [slot] }), slot)
    .catch(() => undefined);
  await waitFor(
    async () =>
      (await pool.query(`SELECT FROM pg_replication_slots WHERE slot_name = $1 AND active`, [slot]))
        .rowCount === 1,
    { message: `a walsender streaming from ${slot}` },
  );
  return { stop: () => service.stop().catch(() => undefined) };
}
