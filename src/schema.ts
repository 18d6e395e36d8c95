// Introspection: what each target table looks like in this database. The shape decides the
// dead predicate (a boolean or a timestamp marks a row revoked or used), and the relation
// kind decides how a sweep walks it. It runs at startup, so a wrong name fails fast with
// exit 2, and again at every sweep, so a table recreated under a running daemon is followed.
import {
  sql,
  type CommonQueryMethods,
  type FragmentSqlToken,
  type IdentifierSqlToken,
} from 'slonik';
import { z } from 'zod';
import { formatTableName, targetsOf, type Config, type TargetConfig } from './config.js';
import { SchemaError } from './errors.js';

export type MarkShape = 'boolean' | 'timestamp';

export interface Relation {
  readonly schema: string;
  readonly name: string;
}

export interface TableShape {
  readonly target: TargetConfig;
  readonly relation: Relation;
  readonly partitioned: boolean;
  /**
   * RANGE-partitioned on the expiry column alone, one level deep: expired partitions can be
   * dropped whole. Any other partitioning is swept leaf by leaf like a plain table.
   */
  readonly partitionedByExpiry: boolean;
  /** The relations that hold rows: the table itself, or a partitioned table's leaves. */
  readonly leaves: readonly Relation[];
  readonly idColumn: string;
  /** The id column's base type, one of ID_TYPES: the purge casts the ids it receives to it. */
  readonly idType: IdType;
  readonly markColumn: string;
  readonly markShape: MarkShape;
  readonly expiresAtColumn: string;
  /** Whether install's revoke trigger is on the table (refresh tokens only). */
  readonly revokeTriggerInstalled: boolean;
}

/** The id types a NOTIFY payload's id can be cast back to; token tables use one of these. */
export const ID_TYPES = ['uuid', 'bigint', 'integer', 'text', 'character varying'] as const;
export type IdType = (typeof ID_TYPES)[number];

export const REVOKE_TRIGGER_NAME = 'token_reaper_notify_revoked';

const ID_TYPE_NAMES: Record<IdType, FragmentSqlToken> = {
  uuid: sql.fragment`uuid`,
  bigint: sql.fragment`bigint`,
  integer: sql.fragment`integer`,
  text: sql.fragment`text`,
  // A varchar column compares with text without a cast, and keeps its index.
  'character varying': sql.fragment`text`,
};

/** The id column's type, for casting ids that arrive as text (from a payload, a record). */
export function idTypeOf(shape: Pick<TableShape, 'idType'>): FragmentSqlToken {
  return ID_TYPE_NAMES[shape.idType];
}

const MARK_CANDIDATES = {
  refresh_tokens: { names: ['revoked', 'revoked_at'], variable: 'REFRESH_TOKENS_REVOKED_COLUMN' },
  password_resets: { names: ['used', 'used_at'], variable: 'PASSWORD_RESETS_USED_COLUMN' },
} as const;

const TIMESTAMP_TYPES = ['timestamp with time zone', 'timestamp without time zone'];

const relationRow = z.object({
  oid: z.number(),
  schema: z.string(),
  name: z.string(),
  kind: z.string(),
});
const columnRow = z.object({ name: z.string(), type: z.string(), baseType: z.string() });
const leafRow = z.object({ schema: z.string(), name: z.string() });

export function qualifiedName(relation: Relation) {
  return `${relation.schema}.${relation.name}`;
}

export function relationIdentifier(relation: Relation): IdentifierSqlToken {
  return sql.identifier([relation.schema, relation.name]);
}

/** The relation as a regclass, resolved exactly as named (a plain ::regclass would fold case). */
export function regclassOf(relation: Relation): FragmentSqlToken {
  return sql.fragment`format('%I.%I', ${relation.schema}::text, ${relation.name}::text)::regclass`;
}

export async function describeTarget(
  connection: CommonQueryMethods,
  target: TargetConfig,
): Promise<TableShape> {
  const configured = formatTableName(target.table);
  const variable =
    target.kind === 'refresh_tokens' ? 'REFRESH_TOKENS_TABLE' : 'PASSWORD_RESETS_TABLE';
  // format('%I') quotes the configured name, so to_regclass resolves it exactly as written,
  // through the search_path when it has no schema.
  const regclassText =
    target.table.schema === null
      ? sql.fragment`format('%I', ${target.table.name}::text)`
      : sql.fragment`format('%I.%I', ${target.table.schema}::text, ${target.table.name}::text)`;
  const relation = await connection.maybeOne(sql.type(relationRow)`
    SELECT c.oid::int AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS kind
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass(${regclassText})
  `);
  if (relation === null) {
    throw new SchemaError([
      `table ${configured} does not exist (or is not on the search_path of this connection). Create it, or set ${variable} to the table that holds the ${target.kind.replace('_', ' ')}.`,
    ]);
  }
  if (relation.kind !== 'r' && relation.kind !== 'p') {
    throw new SchemaError([
      `${qualifiedName(relation)} is not a table (pg_class.relkind '${relation.kind}'). Set ${variable} to the table itself.`,
    ]);
  }

  const columns = await connection.any(sql.type(columnRow)`
    SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
           a.atttypid::regtype::text AS "baseType"
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = ${relation.oid} AND a.attnum > 0 AND NOT a.attisdropped
  `);
  const typeOf = new Map(columns.map((column) => [column.name, column.type]));
  const baseTypeOf = new Map(columns.map((column) => [column.name, column.baseType]));
  const where = qualifiedName(relation);
  const prefix = target.kind === 'refresh_tokens' ? 'REFRESH_TOKENS' : 'PASSWORD_RESETS';
  const problems: string[] = [];

  const idType = baseTypeOf.get(target.idColumn);
  if (idType === undefined) {
    problems.push(
      `${where} has no column "${target.idColumn}". Set ${prefix}_ID_COLUMN to its primary key column.`,
    );
  } else if (!(ID_TYPES as readonly string[]).includes(idType)) {
    problems.push(
      `${where}.${target.idColumn} is ${idType}; token-reaper handles ids of type ${ID_TYPES.join(', ')}. Set ${prefix}_ID_COLUMN to such a column.`,
    );
  }
  const expiresAtType = typeOf.get(target.expiresAtColumn);
  if (expiresAtType === undefined) {
    problems.push(
      `${where} has no column "${target.expiresAtColumn}". Set ${prefix}_EXPIRES_AT_COLUMN to the column that holds the expiry time.`,
    );
  } else if (!TIMESTAMP_TYPES.includes(expiresAtType)) {
    problems.push(
      `${where}.${target.expiresAtColumn} is ${expiresAtType}, not a timestamp. Set ${prefix}_EXPIRES_AT_COLUMN to a timestamptz column.`,
    );
  }

  const candidates = MARK_CANDIDATES[target.kind];
  const markNames =
    target.markColumn === null
      ? candidates.names.filter((name) => typeOf.has(name))
      : [target.markColumn];
  let mark: { column: string; shape: MarkShape } | null = null;
  if (markNames.length === 0) {
    problems.push(
      `${where} has no column ${candidates.names.map((name) => `"${name}"`).join(' or ')}. Set ${candidates.variable} to the boolean or timestamp column that marks a row ${target.kind === 'refresh_tokens' ? 'revoked' : 'used'}.`,
    );
  } else if (markNames.length > 1) {
    problems.push(
      `${where} has both ${markNames.map((name) => `"${name}"`).join(' and ')}. Set ${candidates.variable} to the one your auth service writes.`,
    );
  } else {
    const column = markNames[0]!;
    const type = typeOf.get(column);
    if (type === undefined) {
      problems.push(`${where} has no column "${column}". Fix ${candidates.variable}.`);
    } else if (type === 'boolean') {
      mark = { column, shape: 'boolean' };
    } else if (TIMESTAMP_TYPES.includes(type)) {
      mark = { column, shape: 'timestamp' };
    } else {
      problems.push(
        `${where}.${column} is ${type}; token-reaper understands a boolean or a timestamp there. Set ${candidates.variable} to such a column.`,
      );
    }
  }
  if (problems.length > 0 || mark === null) throw new SchemaError(problems);

  const partitioned = relation.kind === 'p';
  const leaves = partitioned
    ? await connection.any(sql.type(leafRow)`
        SELECT n.nspname AS schema, c.relname AS name
        FROM pg_partition_tree(${relation.oid}::oid::regclass) tree
        JOIN pg_catalog.pg_class c ON c.oid = tree.relid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE tree.isleaf
        ORDER BY n.nspname, c.relname
      `)
    : [{ schema: relation.schema, name: relation.name }];

  const partitionedByExpiry =
    partitioned &&
    (await connection.exists(sql.unsafe`
      SELECT 1 FROM pg_catalog.pg_partitioned_table pt
      JOIN pg_catalog.pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
      WHERE pt.partrelid = ${relation.oid} AND pt.partstrat = 'r' AND pt.partnatts = 1
        AND a.attname = ${target.expiresAtColumn}
        AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                        JOIN pg_catalog.pg_class child ON child.oid = i.inhrelid
                        WHERE i.inhparent = pt.partrelid AND child.relkind = 'p')
    `));

  const revokeTriggerInstalled =
    target.kind === 'refresh_tokens' &&
    (await connection.exists(sql.unsafe`
      SELECT 1 FROM pg_catalog.pg_trigger
      WHERE tgrelid = ${relation.oid} AND tgname = ${REVOKE_TRIGGER_NAME} AND NOT tgisinternal
    `));

  return {
    target,
    relation: { schema: relation.schema, name: relation.name },
    partitioned,
    partitionedByExpiry,
    leaves,
    idColumn: target.idColumn,
    idType: idType as IdType,
    markColumn: mark.column,
    markShape: mark.shape,
    expiresAtColumn: target.expiresAtColumn,
    revokeTriggerInstalled,
  };
}

/** Every enabled target, described; a SchemaError names the first table that is wrong. */
export async function describeTargets(
  connection: CommonQueryMethods,
  config: Pick<Config, 'refreshTokens' | 'passwordResets'>,
): Promise<TableShape[]> {
  const shapes: TableShape[] = [];
  for (const target of targetsOf(config)) shapes.push(await describeTarget(connection, target));
  return shapes;
}

/**
 * The targets, described and checked for what running needs beyond their shape: a grace on a
 * boolean revoked column keeps revocation times in token_reaper.revocations, which install
 * creates. (install itself only needs describeTargets: it is what creates the table.)
 */
export async function describeTargetsToRun(
  connection: CommonQueryMethods,
  config: Pick<Config, 'refreshTokens' | 'passwordResets'>,
): Promise<TableShape[]> {
  const shapes = await describeTargets(connection, config);
  const needsRevocations = shapes.find(
    (shape) => shape.markShape === 'boolean' && shape.target.revokedGraceSeconds > 0,
  );
  if (
    needsRevocations &&
    !(await connection.exists(
      sql.unsafe`SELECT 1 WHERE to_regclass('token_reaper.revocations') IS NOT NULL`,
    ))
  ) {
    throw new SchemaError([
      `REFRESH_TOKEN_REVOKED_GRACE needs token_reaper.revocations to keep revocation times for ${qualifiedName(needsRevocations.relation)}, whose "${needsRevocations.markColumn}" column has none. Run "token-reaper install" to create it.`,
    ]);
  }
  return shapes;
}
