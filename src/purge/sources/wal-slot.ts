// The server-side objects of PURGE_SOURCE=wal, in one place for install, uninstall, explain
// and the daemon: the publication of the token tables and the logical replication slot of the
// same name, what the server must allow for them, and how full the slot is.
//
// A slot is the one object token-reaper makes that can hurt the database when forgotten: it
// keeps every WAL segment from its confirmed position on, until the disk is full, unless
// max_slot_wal_keep_size bounds it. So install refuses an unbounded server, uninstall drops
// the slot, and the daemon reports how much WAL it holds.
import pg, { escapeIdentifier, escapeLiteral, type ClientBase } from 'pg';
import { listenerConnectionConfig, type ConnectionSettings } from '../../db.js';
import type { Relation } from '../../relation.js';

/** pgoutput ships with PostgreSQL: nothing to install on the server. */
export const OUTPUT_PLUGIN = 'pgoutput';

export interface SlotState {
  readonly exists: boolean;
  /** wal_status = 'lost': the server removed WAL the slot needed; it can only be recreated. */
  readonly lost: boolean;
  /** A walsender streams from it now (another daemon, or this one). */
  readonly active: boolean;
  readonly activePid: number | null;
  /** WAL the slot keeps from removal: current LSN − restart_lsn. Null when unknown. */
  readonly retainedBytes: number | null;
  /** Where streaming resumes: the position last acknowledged, or the slot's creation point. */
  readonly confirmedFlushLsn: string | null;
}

const MISSING: SlotState = {
  exists: false,
  lost: false,
  active: false,
  activePid: null,
  retainedBytes: null,
  confirmedFlushLsn: null,
};

/**
 * A short-lived plain connection to the session URL, closed after `work`: for reading and
 * making the slot, which a replication connection's simple protocol cannot do with parameters.
 * Its queries time out after 5 s, unless `patient`: making a slot waits for every transaction
 * in progress to end, however long that takes.
 */
export async function withSlotClient<T>(
  config: ConnectionSettings,
  work: (client: ClientBase) => Promise<T>,
  { patient = false }: { patient?: boolean } = {},
): Promise<T> {
  const client = new pg.Client({
    ...listenerConnectionConfig(config),
    ...(patient ? { query_timeout: 0 } : {}),
  });
  client.on('error', () => undefined);
  try {
    await client.connect();
    return await work(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Whether the publication that `wal` streams exists. */
export async function publicationExists(client: ClientBase, publication: string) {
  const { rowCount } = await client.query('SELECT FROM pg_publication WHERE pubname = $1', [
    publication,
  ]);
  return rowCount !== null && rowCount > 0;
}

export async function readSlotState(client: ClientBase, slot: string): Promise<SlotState> {
  const { rows } = await client.query<{
    lost: boolean;
    active: boolean;
    active_pid: number | null;
    retained: string | null;
    confirmed: string | null;
  }>(
    `SELECT coalesce(wal_status = 'lost', false) AS lost, active, active_pid,
            pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint::text AS retained,
            confirmed_flush_lsn::text AS confirmed
     FROM pg_replication_slots WHERE slot_name = $1`,
    [slot],
  );
  const row = rows[0];
  if (row === undefined) return MISSING;
  return {
    exists: true,
    lost: row.lost,
    active: row.active,
    activePid: row.active_pid,
    retainedBytes: row.retained === null ? null : Number(row.retained),
    confirmedFlushLsn: row.confirmed,
  };
}

/**
 * Why this server cannot give `wal` a slot, one message each with its fix; empty when it can.
 * Reads settings and the current role only, so any role may run it.
 */
export async function checkWalPrerequisites(client: ClientBase): Promise<string[]> {
  const { rows } = await client.query<{
    wal_level: string;
    keep_size: string;
    may_replicate: boolean;
    role: string;
  }>(
    `SELECT current_setting('wal_level') AS wal_level,
            current_setting('max_slot_wal_keep_size') AS keep_size,
            current_user AS role,
            EXISTS (
              SELECT FROM pg_roles r
              WHERE pg_has_role(current_user, r.oid, 'USAGE')
                AND (r.rolreplication OR r.rolsuper OR r.rolname = 'rds_replication')
            ) AS may_replicate`,
  );
  const facts = rows[0]!;
  const problems: string[] = [];
  if (facts.wal_level !== 'logical') {
    problems.push(
      `PURGE_SOURCE=wal needs wal_level = logical, and the server has ${facts.wal_level}. Run "ALTER SYSTEM SET wal_level = logical;" and restart PostgreSQL (on a managed service, set the parameter: rds.logical_replication = 1 on RDS, cloudsql.logical_decoding = on on Cloud SQL), or use PURGE_SOURCE=poll.`,
    );
  }
  if (!facts.may_replicate) {
    problems.push(
      `PURGE_SOURCE=wal needs a role with the REPLICATION attribute to read the slot, and ${facts.role} has none. Run "ALTER ROLE ${escapeIdentifier(facts.role)} REPLICATION;" as a superuser (on RDS, "GRANT rds_replication TO ${escapeIdentifier(facts.role)};"), or let "token-reaper install --role" grant it.`,
    );
  }
  if (facts.keep_size === '-1') {
    problems.push(
      `PURGE_SOURCE=wal needs max_slot_wal_keep_size to bound the WAL a slot may keep, and it is -1 (unbounded): a daemon that stays away would fill the disk. Run "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();" with a size the disk can spare; past it the slot is given up, and token-reaper recreates it and catches up.`,
    );
  }
  return problems;
}

/**
 * Tables whose UPDATEs publishing would break, one message each: PostgreSQL refuses an UPDATE
 * on a table that publishes updates unless the table has a replica identity (a primary key, a
 * REPLICA IDENTITY USING INDEX, or FULL). So adding a table without one to the publication
 * would make the auth service's revocations fail. Each partition counts, since rows live there.
 */
export async function checkReplicaIdentities(
  client: ClientBase,
  tables: readonly Relation[],
): Promise<string[]> {
  const problems: string[] = [];
  for (const table of tables) {
    const { rows } = await client.query<{ name: string }>(
      `WITH target AS (SELECT format('%I.%I', $1::text, $2::text)::regclass AS oid),
       -- pg_partition_tree lists nothing for a table that is not partitioned.
       leaves AS (
         SELECT relid FROM target, pg_partition_tree(target.oid) WHERE isleaf
         UNION SELECT oid FROM target
         WHERE (SELECT relkind FROM pg_catalog.pg_class WHERE oid = target.oid) = 'r')
       SELECT format('%I.%I', n.nspname, c.relname) AS name
       FROM leaves
       JOIN pg_catalog.pg_class c ON c.oid = leaves.relid
       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
       WHERE (
         c.relreplident = 'n'
         OR (c.relreplident = 'd' AND NOT EXISTS (
           SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
         OR (c.relreplident = 'i' AND NOT EXISTS (
           SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)))
       ORDER BY 1`,
      [table.schema, table.name],
    );
    for (const { name } of rows) {
      problems.push(
        `PURGE_SOURCE=wal would publish ${name}, which has no replica identity (no primary key): PostgreSQL would then refuse every UPDATE of it, the auth service's revocations included. Give it a primary key, or run "ALTER TABLE ${name} REPLICA IDENTITY FULL;", or use PURGE_SOURCE=poll.`,
      );
    }
  }
  return problems;
}

/** Creates the slot; one that exists already (another daemon's, a second install) is kept. */
export async function createSlot(client: ClientBase, slot: string): Promise<void> {
  try {
    await client.query(createSlotSql(slot));
  } catch (error) {
    // Made by another daemon between the check and the creation.
    if ((error as { code?: string }).code !== '42710') throw error;
  }
}

/**
 * Drops the slot if it exists in this database; a slot a walsender holds is refused by the
 * server (55006). Slots belong to the whole server: another database's slot of the same name
 * is not token-reaper's to drop.
 */
export async function dropSlot(
  client: ClientBase,
  slot: string,
  { onlyLost = false }: { onlyLost?: boolean } = {},
): Promise<boolean> {
  // onlyLost: two daemons that both found the slot lost must not drop the one the other
  // has just made again.
  const { rows } = await client.query<{ dropped: boolean }>(
    `SELECT count(pg_drop_replication_slot(slot_name)) > 0 AS dropped
     FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()
       AND (NOT $2 OR (wal_status = 'lost' AND NOT active))`,
    [slot, onlyLost],
  );
  return rows[0]?.dropped ?? false;
}

/**
 * SQL that makes the slot unless it exists: what install and the daemon run, and what
 * `install --print` shows. On PostgreSQL 17 and later it is a failover slot, which standbys
 * with sync_replication_slots = on keep a copy of, so that a promoted standby has it. A DO
 * block, because the five-argument function does not exist before 17; it writes nothing, so
 * the slot can still be made in its transaction.
 */
export function createSlotSql(slot: string): string {
  const name = escapeLiteral(slot);
  return [
    'DO $token_reaper$',
    'BEGIN',
    `  IF NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = ${name}) THEN`,
    `    IF current_setting('server_version_num')::int >= 170000 THEN`,
    `      PERFORM pg_create_logical_replication_slot(${name}, '${OUTPUT_PLUGIN}', false, false, true);`,
    '    ELSE',
    `      PERFORM pg_create_logical_replication_slot(${name}, '${OUTPUT_PLUGIN}');`,
    '    END IF;',
    '  END IF;',
    'END',
    '$token_reaper$;',
  ].join('\n');
}

export function dropSlotSql(slot: string): string {
  return `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = ${escapeLiteral(slot)} AND database = current_database();`;
}

/**
 * The publication: updates and inserts only (a revocation is one or the other), and a
 * partitioned table's changes under its own name rather than its partitions', which come and go.
 */
export function publicationSql(publication: string, tables: readonly Relation[]): string[] {
  const name = escapeIdentifier(publication);
  const list = tables
    .map((table) => `${escapeIdentifier(table.schema)}.${escapeIdentifier(table.name)}`)
    .join(', ');
  return [
    `DROP PUBLICATION IF EXISTS ${name};`,
    `CREATE PUBLICATION ${name} FOR TABLE ${list} WITH (publish = 'update, insert', publish_via_partition_root = true);`,
  ];
}

export function dropPublicationSql(publication: string): string {
  return `DROP PUBLICATION IF EXISTS ${escapeIdentifier(publication)};`;
}
