// WAL accounting around one contender.
//
// The figure the issue asks for is pg_wal_lsn_diff of the WAL position before and after, on an
// otherwise idle server. The position is pg_current_wal_insert_lsn(): pg_current_wal_lsn() is
// where the WAL has been written to, which on a server with synchronous_commit=off (the
// embedded one) lags by up to wal_writer_delay.
//
// That difference counts everything the server wrote: the contender's WAL, but also the
// concurrent workload's, and anything another database did meanwhile. When the pg_walinspect
// extension is there (PostgreSQL 15+ contrib), the records of the same window are split three
// ways, so the contender's share is exact and a busy server is noticed:
// - workload: records of the transactions the workload reported writing in;
// - contender: every other record that touches a block of this database, and every record of a
//   transaction that did (its commit record, say). Records without a transaction that touch this
//   database (page pruning, say) are the deletion's consequence and count here too;
// - other: the rest, other databases and the server itself (checkpoint records).
// A checkpoint during a long contender would recycle the window's first segments before they
// are read, so a temporary physical replication slot holds them for the window; it goes away
// with its session, even if the benchmark dies.
import { randomBytes } from 'node:crypto';

import pg from 'pg';

import { waitFor } from '../support/cli.js';

import type { BenchDatabase, BenchServer } from './databases.js';

export interface WalAccount {
  /** pg_wal_lsn_diff around the contender: everything the server wrote. */
  readonly totalBytes: number;
  /** The contender's records, or null without pg_walinspect. */
  readonly contenderBytes: number | null;
  readonly workloadBytes: number | null;
  /** Records of other databases or of nobody: more than a little means the server was busy. */
  readonly otherBytes: number | null;
  /** Why there is no split, when there is none. */
  readonly note: string | null;
}

export interface WalWindow {
  /** Closes the window and accounts for the WAL written since it opened. */
  finish(
    database: BenchDatabase,
    workloadTransactionIds: ReadonlySet<string>,
    inspect: boolean,
  ): Promise<WalAccount>;
  /** Releases the slot and its session; safe after finish() and twice. */
  close(): Promise<void>;
}

export async function openWalWindow(server: BenchServer): Promise<WalWindow> {
  const session = new pg.Client({ connectionString: server.url });
  session.on('error', () => undefined);
  await session.connect();
  const slot = await session
    .query(
      `SELECT pg_create_physical_replication_slot($1, immediately_reserve => true,
                                                   temporary => true)`,
      [`token_reaper_bench_${randomBytes(4).toString('hex')}`],
    )
    .then(() => null)
    .catch((error: Error) => `no replication slot could hold the WAL (${error.message})`);
  const insertLsn = async () =>
    (await session.query<{ lsn: string }>('SELECT pg_current_wal_insert_lsn() AS lsn')).rows[0]!
      .lsn;
  const start = await insertLsn();

  const account = async (
    database: BenchDatabase,
    workloadTransactionIds: ReadonlySet<string>,
    inspect: boolean,
  ): Promise<WalAccount> => {
    const end = await insertLsn();
    const [diff] = (
      await session.query<{ bytes: string }>('SELECT pg_wal_lsn_diff($1, $2) AS bytes', [
        end,
        start,
      ])
    ).rows;
    const totalBytes = Number(diff!.bytes);
    const unsplit = (note: string): WalAccount => ({
      totalBytes,
      contenderBytes: null,
      workloadBytes: null,
      otherBytes: null,
      note,
    });
    if (!inspect) return unsplit('pg_walinspect is not available on this server');
    try {
      // pg_get_wal_records_info reads only what has been flushed; the WAL writer gets there
      // within wal_writer_delay.
      await waitFor(
        async () => {
          const flushed = await session.query<{ done: boolean }>(
            'SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn AS done',
            [end],
          );
          return flushed.rows[0]!.done;
        },
        { timeoutMs: 10_000, intervalMs: 20, message: 'the WAL to be flushed' },
      );
      const [split] = await database.query<{ contender: string; workload: string; other: string }>(
        `WITH record AS (
           SELECT xid::text AS xid, record_length,
                  coalesce(block_ref LIKE '%rel %/' || (SELECT oid FROM pg_database
                                                        WHERE datname = current_database())
                                        || '/%', false) AS here
           FROM pg_get_wal_records_info($1, $2)),
         here AS (SELECT DISTINCT xid FROM record WHERE here AND xid <> '0')
         SELECT coalesce(sum(record_length) FILTER (WHERE xid = ANY($3::text[])), 0) AS workload,
                coalesce(sum(record_length) FILTER (
                  WHERE NOT xid = ANY($3::text[]) AND (here OR xid IN (SELECT xid FROM here))
                ), 0) AS contender,
                coalesce(sum(record_length) FILTER (
                  WHERE NOT xid = ANY($3::text[]) AND NOT here AND xid NOT IN (SELECT xid FROM here)
                ), 0) AS other
         FROM record`,
        [start, end, [...workloadTransactionIds]],
      );
      return {
        totalBytes,
        contenderBytes: Number(split!.contender),
        workloadBytes: Number(split!.workload),
        otherBytes: Number(split!.other),
        note: null,
      };
    } catch (error) {
      const reason = `pg_walinspect failed: ${(error as Error).message}`;
      return unsplit(slot === null ? reason : `${reason}; ${slot}`);
    }
  };

  let closed: Promise<void> | undefined;
  // Ending the session drops the temporary slot, which releases the WAL.
  const close = () => (closed ??= session.end().catch(() => undefined));
  return {
    async finish(database, workloadTransactionIds, inspect) {
      try {
        return await account(database, workloadTransactionIds, inspect);
      } finally {
        await close();
      }
    },
    close,
  };
}
