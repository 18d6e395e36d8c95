// `install --role NAME`: a role with exactly the rights the daemon needs, and nothing more.
//
// What the daemon runs, and what PostgreSQL checks for it (test/role.test.ts runs the daemon
// as such a role):
// - connecting: CONNECT on the database. PUBLIC has it by default; it is granted anyway, so
//   that a database that revoked it from PUBLIC works too;
// - naming a table (schema.table, ::regclass, to_regclass): USAGE on its schema. The catalog
//   reads (pg_class, pg_attribute, pg_inherits, pg_trigger, pg_partition_tree, pg_get_expr),
//   pg_relation_size, pg_try_advisory_lock, set_config, LISTEN and UNLISTEN need nothing;
// - the dead predicate, count(*) and max(expires_at): SELECT; the deletes: DELETE. On the
//   table, and on each leaf partition of a partitioned one: the sweep and the catch-up delete
//   from the leaves directly, and a parent's grants only cover access through the parent;
// - with a grace on a boolean revoked column (REFRESH_TOKEN_REVOKED_GRACE), the revocation
//   times in token_reaper.revocations: USAGE on token_reaper, and SELECT, INSERT and DELETE;
// - where an unfinished sweep stopped, token_reaper.sweep_positions: SELECT, INSERT, UPDATE
//   and DELETE;
// - with SWEEP_MAX_REPLICA_LAG, the standbys' and slots' positions in pg_stat_replication:
//   pg_read_all_stats, without which they read as NULL;
// - on a table partitioned by expiry, DROP TABLE, DETACH PARTITION and CREATE TABLE …
//   PARTITION OF. PostgreSQL lets only the owner do those, and has no finer privilege for
//   them (not even MAINTAIN, in 17). So the role becomes a member of the table's owner, and
//   with that holds every right the owner holds. That is refused when the owner is a
//   superuser (or a member of one): the role could then SET ROLE to a superuser;
// - per PURGE_SOURCE: notify's LISTEN needs nothing (the trigger runs as the auth service's
//   writer, and its function needs no grant); poll's query is the catch-up's, covered above;
//   wal streams from the slot install made, and START_REPLICATION, on a replication
//   connection, needs the REPLICATION attribute, which no GRANT can give.
//
// The role is created NOLOGIN when it is missing; an existing role keeps its attributes and
// only gains grants (and under wal, REPLICATION). Roles and grants belong to the deployment,
// not to token-reaper's schema, so none of this is recorded in token_reaper.schema_version.
// Every statement is idempotent, and they run in one transaction under install's advisory lock.
import type pg from 'pg';
import { escapeIdentifier, escapeLiteral } from 'pg';
import { IDENTIFIER, MAXIMUM_IDENTIFIER_BYTES, type PurgeSourceName } from './config.js';
import { ConfigurationError } from './errors.js';
import { acquireInstallLock, INSTALL_LOCK } from './install.js';
import type { Logger } from './logger.js';
import { qualifiedName, recordsRevocationTimes, type Relation, type TableShape } from './schema.js';

/** The relation the daemon keeps revocation times in, when a grace needs them. */
const REVOCATIONS: Relation = { schema: 'token_reaper', name: 'revocations' };

/** Where an unfinished sweep stopped (sweep/positions.ts). */
const POSITIONS: Relation = { schema: 'token_reaper', name: 'sweep_positions' };

/** What of the daemon's configuration decides a grant. */
export interface RoleNeeds {
  source: PurgeSourceName;
  /** SWEEP_MAX_REPLICA_LAG is set: the sweep reads the standbys' and slots' positions. */
  readsReplicaLag: boolean;
}

/** PostgreSQL 16 added the INHERIT option to GRANT role TO role. */
const GRANT_OPTIONS_VERSION = 160_000;

export interface TableOwner {
  readonly name: string;
  /** A superuser, or a member of one: a member of this owner could become a superuser. */
  readonly superuser: boolean;
  /** CREATE on the table's schema, which creating a partition needs. */
  readonly canCreateInSchema: boolean;
  /** CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS: a member can SET ROLE to the owner and use them. */
  readonly attributes: readonly string[];
  /** The owner is the role, or a member of it: a membership would be circular. */
  readonly memberOfRole: boolean;
}

/** What the role plan needs to know about the database beyond the tables' shapes. */
export interface RoleFacts {
  /** server_version_num. */
  readonly serverVersion: number;
  /** The role as it exists now, or null when the plan creates it. */
  readonly existing: { readonly superuser: boolean; readonly inherit: boolean } | null;
  /** The owner of each target table, by qualified name. */
  readonly owners: ReadonlyMap<string, TableOwner>;
  /** Relations, by qualified name, with row-level security enabled. */
  readonly rowSecurity: ReadonlySet<string>;
}

export interface RoleStatement {
  /** Why the statement is there, printed above it; null for none. */
  readonly comment: string | null;
  readonly sql: string;
}

export interface RolePlan {
  readonly role: string;
  readonly statements: readonly RoleStatement[];
  /** Tables partitioned by expiry, whose owner the role becomes a member of. */
  readonly ownerMemberships: readonly { readonly table: string; readonly owner: string }[];
  /** Printed at the top of the plan and logged when it is applied. */
  readonly warnings: readonly string[];
}

/** The --role value, checked like every other name; a ConfigurationError (exit 2) otherwise. */
export function checkRoleName(value: string): string {
  const problems: string[] = [];
  if (!IDENTIFIER.test(value) || Buffer.byteLength(value) > MAXIMUM_IDENTIFIER_BYTES) {
    problems.push(
      `--role ${JSON.stringify(value)} is not a valid role name. Use letters, digits, _ or $, not starting with a digit, at most 63 bytes; the name is used exactly as written (case-sensitive).`,
    );
  } else if (value.startsWith('pg_') || value === 'public' || value === 'none') {
    problems.push(
      `--role ${JSON.stringify(value)} is a name PostgreSQL reserves. Name a role of its own for the daemon, such as token_reaper.`,
    );
  }
  if (problems.length > 0) throw new ConfigurationError(problems);
  return value;
}

interface OwnerRow {
  owner: string;
  superuser: boolean;
  can_create: boolean;
  attributes: string[];
  member_of_role: boolean;
}

/** Reads the role, the tables' owners and the server version. */
export async function describeRoleFacts(
  client: Pick<pg.ClientBase, 'query'>,
  roleName: string,
  shapes: readonly TableShape[],
): Promise<{ databaseName: string; facts: RoleFacts }> {
  const server = await client.query<{ database: string; version: number }>(
    `SELECT current_database() AS database, current_setting('server_version_num')::int AS version`,
  );
  const role = await client.query<{ superuser: boolean; inherit: boolean }>(
    'SELECT rolsuper AS superuser, rolinherit AS inherit FROM pg_catalog.pg_roles WHERE rolname = $1',
    [roleName],
  );
  const owners = new Map<string, TableOwner>();
  for (const shape of shapes) {
    const result = await client.query<OwnerRow>(
      `SELECT o.rolname AS owner,
              EXISTS (SELECT 1 FROM pg_catalog.pg_roles s
                      WHERE s.rolsuper AND pg_catalog.pg_has_role(o.oid, s.oid, 'MEMBER')) AS superuser,
              pg_catalog.has_schema_privilege(o.oid, c.relnamespace, 'CREATE') AS can_create,
              array_remove(ARRAY[
                CASE WHEN o.rolcreaterole THEN 'CREATEROLE' END,
                CASE WHEN o.rolcreatedb THEN 'CREATEDB' END,
                CASE WHEN o.rolreplication THEN 'REPLICATION' END,
                CASE WHEN o.rolbypassrls THEN 'BYPASSRLS' END], NULL) AS attributes,
              coalesce(pg_catalog.pg_has_role(o.oid, r.oid, 'MEMBER'), false) AS member_of_role
       FROM pg_catalog.pg_class c
       JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
       LEFT JOIN pg_catalog.pg_roles r ON r.rolname = $3
       WHERE c.oid = format('%I.%I', $1::text, $2::text)::regclass`,
      [shape.relation.schema, shape.relation.name, roleName],
    );
    const row = result.rows[0]!;
    owners.set(qualifiedName(shape.relation), {
      name: row.owner,
      superuser: row.superuser,
      canCreateInSchema: row.can_create,
      attributes: row.attributes,
      memberOfRole: row.member_of_role,
    });
  }
  const relations = shapes.flatMap(relationsOf);
  const secured = await client.query<{ schema: string; name: string }>(
    `SELECT n.nspname AS schema, c.relname AS name
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relrowsecurity
       AND (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))`,
    [relations.map((relation) => relation.schema), relations.map((relation) => relation.name)],
  );
  return {
    databaseName: server.rows[0]!.database,
    facts: {
      serverVersion: server.rows[0]!.version,
      existing: role.rows[0] ?? null,
      owners,
      rowSecurity: new Set(secured.rows.map(qualifiedName)),
    },
  };
}

/**
 * The statements that create the role (if missing) and grant it what the daemon needs on
 * these tables, in this database. Throws a ConfigurationError for a role or an owner that
 * least privilege cannot be had with.
 */
export function buildRolePlan(
  roleName: string,
  shapes: readonly TableShape[],
  databaseName: string,
  facts: RoleFacts,
  needs: RoleNeeds = { source: 'notify', readsReplicaLag: false },
): RolePlan {
  const { source } = needs;
  const role = escapeIdentifier(roleName);
  const problems: string[] = [];
  const warnings: string[] = [];
  if (facts.existing?.superuser) {
    problems.push(
      `--role ${roleName} is a superuser, which has every right already. Name a role of its own for the daemon; install creates it.`,
    );
  }

  const statements: RoleStatement[] = [createRoleStatement(roleName)];
  statements.push({
    comment: 'Connect to the database.',
    sql: `GRANT CONNECT ON DATABASE ${escapeIdentifier(databaseName)} TO ${role};`,
  });
  const revocations = shapes.some(recordsRevocationTimes);
  const schemas = [
    ...new Set([
      ...shapes.flatMap(relationsOf).map((relation) => relation.schema),
      ...shapes.flatMap((shape) => shape.references).map((reference) => reference.from.schema),
      REVOCATIONS.schema,
    ]),
  ];
  statements.push({
    comment:
      'Name the tables. Catalog reads, pg_relation_size, advisory locks and LISTEN need nothing more.',
    sql: schemas
      .map((schema) => `GRANT USAGE ON SCHEMA ${escapeIdentifier(schema)} TO ${role};`)
      .join('\n'),
  });

  const memberships = new Map<string, string[]>();
  for (const shape of shapes) {
    const table = qualifiedName(shape.relation);
    statements.push({
      comment: `${table}: SELECT to read the dead predicate and count, DELETE to delete dead rows.`,
      sql: grantOn([shape.relation], role),
    });
    if (shape.partitioned) {
      statements.push({
        comment:
          `Its leaf partitions, which the sweep and the catch-up delete from directly: the grants on ${table} do not cover them. ` +
          (shape.partitionedByExpiry
            ? `Partitions made later are covered by the membership in the owner below.`
            : `Partitions added later need these grants too: run install --role again after adding one.`),
        sql: grantOn(shape.leaves, role),
      });
    }
    for (const reference of shape.references) {
      const columns = reference.columns.map(escapeIdentifier).join(', ');
      const target = `${escapeIdentifier(reference.from.schema)}.${escapeIdentifier(reference.from.name)}`;
      statements.push({
        comment:
          reference.handling === 'keep'
            ? `${qualifiedName(reference.from)} references ${table} (${reference.constraint}): read the reference, to keep the rows it still points at.`
            : `${qualifiedName(reference.from)} references ${table} (${reference.constraint}): set the reference to NULL when its row goes.`,
        sql:
          reference.handling === 'keep'
            ? `GRANT SELECT (${columns}) ON ${target} TO ${role};`
            : `GRANT SELECT (${columns}), UPDATE (${columns}) ON ${target} TO ${role};`,
      });
    }
    // A member of the owner is exempt from row-level security, unless the table forces it.
    for (const relation of shape.partitionedByExpiry ? [] : relationsOf(shape)) {
      if (facts.rowSecurity.has(qualifiedName(relation))) {
        warnings.push(
          `row-level security is enabled on ${qualifiedName(relation)}: the role sees and deletes only the rows its policies allow, and with no policy none at all. Add one, for example: CREATE POLICY token_reaper ON ${escapeIdentifier(relation.schema)}.${escapeIdentifier(relation.name)} TO ${role} USING (true);`,
        );
      }
    }
    if (!shape.partitionedByExpiry) continue;
    const owner = facts.owners.get(table)!;
    if (owner.superuser) {
      problems.push(
        `${table} is partitioned by expiry and owned by ${owner.name}, a superuser (or a member of one). Dropping and creating its partitions needs membership in the owner, and membership in ${owner.name} would let --role ${roleName} become a superuser. Give the table (and its partitions) an owner of its own, such as the auth service's role: ALTER TABLE ${table} OWNER TO auth_owner; then run install --role again.`,
      );
      continue;
    }
    if (owner.memberOfRole) {
      problems.push(
        `${table} is owned by ${owner.name}, which is --role ${roleName} itself or one of its members. Name a role of its own for the daemon, not the table's owner.`,
      );
      continue;
    }
    if (
      facts.existing !== null &&
      !facts.existing.inherit &&
      facts.serverVersion < GRANT_OPTIONS_VERSION
    ) {
      problems.push(
        `--role ${roleName} is NOINHERIT, so its membership in ${owner.name} would not let it drop or create the partitions of ${table}. Run ALTER ROLE ${role} INHERIT, or name another role.`,
      );
      continue;
    }
    if (!owner.canCreateInSchema) {
      warnings.push(
        `${owner.name}, the owner of ${table}, has no CREATE privilege on schema ${shape.relation.schema}, so the role cannot make partitions ahead there either (sweep.partition_create_failed). Run GRANT CREATE ON SCHEMA ${escapeIdentifier(shape.relation.schema)} TO ${escapeIdentifier(owner.name)};`,
      );
    }
    if (owner.attributes.length > 0) {
      warnings.push(
        `${owner.name}, the owner of ${table}, has ${owner.attributes.join(', ')}: as its member, the role can SET ROLE ${escapeIdentifier(owner.name)} and use them. An owner role without them keeps the daemon's rights smaller.`,
      );
    }
    memberships.set(owner.name, [...(memberships.get(owner.name) ?? []), table]);
  }
  if (problems.length > 0) throw new ConfigurationError(problems);

  if (source === 'wal' && shapes.some((shape) => shape.notify && shape.marker !== null)) {
    statements.push(replicationStatement(roleName));
  }

  if (revocations) {
    statements.push({
      comment:
        'The revocation times a grace on a boolean revoked column keeps (REFRESH_TOKEN_REVOKED_GRACE): recorded, read and forgotten.',
      sql: `GRANT SELECT, INSERT, DELETE ON TABLE ${escapeIdentifier(REVOCATIONS.schema)}.${escapeIdentifier(REVOCATIONS.name)} TO ${role};`,
    });
  }

  statements.push({
    comment:
      'Where an unfinished sweep stopped (SWEEP_MAX_DURATION, a restart): read, saved and cleared.',
    sql: `GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE ${escapeIdentifier(POSITIONS.schema)}.${escapeIdentifier(POSITIONS.name)} TO ${role};`,
  });
  if (needs.readsReplicaLag) {
    statements.push({
      comment: `SWEEP_MAX_REPLICA_LAG: pg_read_all_stats (the part of pg_monitor it needs), to read where the standbys and logical slots are in pg_stat_replication. It also shows ${roleName} the text of every session's current query in pg_stat_activity: leave SWEEP_MAX_REPLICA_LAG unset if the auth service's queries carry token values as literals rather than parameters.`,
      sql: `GRANT pg_read_all_stats TO ${role};`,
    });
  }

  const ownerMemberships: { table: string; owner: string }[] = [];
  for (const [owner, tables] of memberships) {
    for (const table of tables) ownerMemberships.push({ table, owner });
    const options = facts.serverVersion >= GRANT_OPTIONS_VERSION ? ' WITH INHERIT TRUE' : '';
    statements.push({
      comment: wrap(
        `MEMBERSHIP IN THE TABLE'S OWNER. ${tables.join(', ')} ${tables.length === 1 ? 'is' : 'are'} partitioned by expiry, and the sweep drops, detaches and creates partitions. PostgreSQL allows that only to the owner, and has no finer privilege for it (not even MAINTAIN, in 17). So ${roleName} becomes a member of ${owner}, and with that holds every right ${owner} holds: INSERT, UPDATE, TRUNCATE, ALTER and DROP on ${tables.length === 1 ? 'this table' : 'these tables'}, and the same on everything else ${owner} owns or is granted.`,
        '!!! ',
      ),
      sql: `GRANT ${escapeIdentifier(owner)} TO ${role}${options};`,
    });
  }
  return { role: roleName, statements, ownerMemberships, warnings };
}

/** Reads what the plan needs and builds it. */
export async function planRole(
  client: Pick<pg.ClientBase, 'query'>,
  roleName: string,
  shapes: readonly TableShape[],
  needs?: RoleNeeds,
): Promise<RolePlan> {
  const { databaseName, facts } = await describeRoleFacts(client, roleName, shapes);
  return buildRolePlan(roleName, shapes, databaseName, facts, needs);
}

/**
 * PURGE_SOURCE=wal: the daemon streams the token tables' changes from the slot install made,
 * with START_REPLICATION on a replication connection, and PostgreSQL lets only a role with the
 * REPLICATION attribute open one; no GRANT gives it. Install makes the slot, so the role needs
 * it only to read (and to make the slot again, should the server give it up).
 */
function replicationStatement(roleName: string): RoleStatement {
  return {
    comment: `PURGE_SOURCE=wal: REPLICATION, to stream the token tables' changes from the slot install made (START_REPLICATION needs it; no GRANT can give it). A REPLICATION role may also read every change any slot decodes, and take a base backup of the whole server where pg_hba.conf lets it make a physical replication connection (a "replication" line): give ${roleName} no such line. On RDS run "GRANT rds_replication TO ${escapeIdentifier(roleName)};" instead.`,
    sql: `ALTER ROLE ${escapeIdentifier(roleName)} REPLICATION;`,
  };
}

/** The plan as one SQL script, in the style of formatInstallPlan. */
export function formatRolePlan(plan: RolePlan): string {
  const role = escapeIdentifier(plan.role);
  const parts = [
    [
      `-- token-reaper role plan: the role ${plan.role} with exactly the rights the daemon needs, run after`,
      '-- the install plan. It belongs to this deployment and is not recorded in token_reaper.schema_version;',
      '-- running it again changes nothing. The role is created NOLOGIN; give it a login, either',
      `--   ALTER ROLE ${role} LOGIN PASSWORD '…';      -- and DATABASE_URL=postgres://${plan.role}:…@host/db`,
      `-- or grant it to a role that logs in:  GRANT ${role} TO some_login_role;`,
      ...plan.warnings.map((warning) => `-- WARNING: ${warning}`),
    ].join('\n'),
    'BEGIN;',
    ...plan.statements.map((statement) =>
      statement.comment === null
        ? statement.sql
        : `${commentLines(statement.comment)}\n${statement.sql}`,
    ),
    'COMMIT;',
  ];
  return `${parts.join('\n\n')}\n`;
}

export interface RoleResult {
  created: boolean;
}

/** Runs the plan in one transaction, under install's advisory lock, and logs what it did. */
export async function applyRolePlan(
  client: pg.Client,
  plan: RolePlan,
  logger: Logger,
): Promise<RoleResult> {
  const log = logger.child('install');
  await acquireInstallLock(client, log);
  try {
    const existing = await client.query('SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1', [
      plan.role,
    ]);
    await client.query('BEGIN');
    try {
      for (const statement of plan.statements) await client.query(statement.sql);
      await client.query('COMMIT');
    } catch (error) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw error;
    }
    const created = existing.rowCount === 0;
    for (const warning of plan.warnings) {
      log.warn('install.role_warning', warning, { role: plan.role });
    }
    for (const { table, owner } of plan.ownerMemberships) {
      log.warn(
        'install.role_owner_membership',
        `${plan.role} is now a member of ${owner}, the owner of ${table}: dropping and creating partitions needs ownership, so ${plan.role} holds every right ${owner} holds`,
        { role: plan.role, table, owner },
      );
    }
    log.info(
      'install.role_applied',
      created
        ? `created role ${plan.role} (NOLOGIN) with the rights the daemon needs`
        : `role ${plan.role} existed; granted the rights the daemon needs`,
      { role: plan.role, created },
    );
    return { created };
  } finally {
    await client.query('SELECT pg_advisory_unlock($1, $2)', [
      INSTALL_LOCK.classId,
      INSTALL_LOCK.objectId,
    ]);
  }
}

/** The relations the daemon reads and deletes from: the table, and a partitioned one's leaves. */
function relationsOf(shape: TableShape): Relation[] {
  return shape.partitioned ? [shape.relation, ...shape.leaves] : [shape.relation];
}

function grantOn(relations: readonly Relation[], role: string) {
  return relations
    .map(
      (relation) =>
        `GRANT SELECT, DELETE ON TABLE ${escapeIdentifier(relation.schema)}.${escapeIdentifier(relation.name)} TO ${role};`,
    )
    .join('\n');
}

/** CREATE ROLE … NOLOGIN unless it exists: PostgreSQL has no CREATE ROLE IF NOT EXISTS. */
function createRoleStatement(roleName: string): RoleStatement {
  const body = [
    'BEGIN',
    `  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = ${escapeLiteral(roleName)}) THEN`,
    `    CREATE ROLE ${escapeIdentifier(roleName)} NOLOGIN;`,
    '  END IF;',
    'END',
  ].join('\n');
  // A role name may hold a $, so the quote's tag must not occur in the body.
  let tag = '$role$';
  for (let n = 1; body.includes(tag); n += 1) tag = `$role${n}$`;
  return {
    comment:
      'The role, NOLOGIN, unless it exists: an existing role keeps its attributes and only gains the grants below.',
    sql: `DO ${tag}\n${body}\n${tag};`,
  };
}

function commentLines(comment: string) {
  return wrap(comment)
    .split('\n')
    .map((line) => `-- ${line}`)
    .join('\n');
}

/** Words wrapped at 96 characters, each line after the first starting with `prefix` too. */
function wrap(text: string, prefix = '') {
  const lines: string[] = [];
  for (const paragraph of text.split('\n')) {
    let line = prefix;
    for (const word of paragraph.split(' ')) {
      if (line.length > prefix.length && line.length + 1 + word.length > 96) {
        lines.push(line);
        line = prefix;
      }
      line += line.length > prefix.length ? ` ${word}` : word;
    }
    lines.push(line);
  }
  return lines.join('\n');
}
