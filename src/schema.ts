// Introspection: the one place that reads a table's shape. It resolves each target's rule
// against the catalog (which table, which columns, how each time column is read, what
// references the table) into a TableShape that every path uses. It checks every target
// before reporting, so a deployment sees all of its problems in one run, and it runs again
// whenever the shape may have changed (each sweep; startup), so a table recreated or
// converted under a running daemon is followed.
import { sql, type CommonQueryMethods, type FragmentSqlToken } from 'slonik';
import { z } from 'zod';
import type { Config } from './config.js';
import { requirePrimary } from './db.js';
import { SchemaError } from './errors.js';
import { qualifiedName, type Relation } from './relation.js';
import type { ColumnChoice, QualifiedName, TargetRule } from './targets/rule.js';
import {
  EPOCH_TYPES,
  TIMESTAMP_WITHOUT_TIME_ZONE,
  TIMESTAMP_WITH_TIME_ZONE,
  type TimeColumn,
} from './targets/time.js';

export {
  columnOf,
  qualifiedName,
  regclassOf,
  relationIdentifier,
  type Relation,
} from './relation.js';

/** The id types a NOTIFY payload's id can be cast back to. */
export const ID_TYPES = [
  'uuid',
  'bigint',
  'integer',
  'smallint',
  'text',
  'character varying',
  'character',
] as const;
export type IdType = (typeof ID_TYPES)[number];

export type Marker =
  /** A boolean: `revoked`, `used`, or an `active` flag whose false marks the row dead. */
  | {
      readonly kind: 'flag';
      readonly column: string;
      readonly dead: boolean;
      readonly graceSeconds: number;
      readonly graceFrom: TimeColumn | null;
    }
  /** A time: dead once set and not in the future. */
  | { readonly kind: 'time'; readonly time: TimeColumn; readonly graceSeconds: number };

export type Expiry = (
  | { readonly kind: 'column'; readonly time: TimeColumn }
  | { readonly kind: 'lifetime'; readonly from: TimeColumn; readonly lifetimeSeconds: number }
  | { readonly kind: 'lifetimeColumn'; readonly from: TimeColumn; readonly secondsColumn: string }
) & {
  /** While this column is set, the row does not expire (see ExpiryRule). */
  readonly unlessSet: string | null;
};

/** A foreign key into the target whose rows must be handled when a dead row goes. */
export interface Reference {
  readonly constraint: string;
  readonly from: Relation;
  readonly columns: readonly string[];
  /** The target's columns it references, in the same order. */
  readonly referenced: readonly string[];
  /** `keep`: referenced dead rows stay; `unlink`: the reference is set to NULL with the delete. */
  readonly handling: 'keep' | 'unlink';
}

export interface TableShape {
  readonly rule: TargetRule;
  readonly relation: Relation;
  readonly partitioned: boolean;
  /**
   * RANGE-partitioned on the expiry column alone, one level deep: expired partitions can be
   * dropped whole. Any other partitioning is swept leaf by leaf like a plain table.
   */
  readonly partitionedByExpiry: boolean;
  /** The relations that hold rows: the table itself, or a partitioned table's leaves. */
  readonly leaves: readonly Relation[];
  /** The column that identifies a row, when the rule needs one (the purge, revocation times). */
  readonly id: { readonly column: string; readonly type: IdType } | null;
  readonly marker: Marker | null;
  readonly expiry: Expiry | null;
  readonly keepExpiredForSeconds: number;
  /** Whether revocations are purged promptly: the revoke trigger belongs on this table. */
  readonly notify: boolean;
  readonly revokeTriggerInstalled: boolean;
  readonly references: readonly Reference[];
  /** Foreign keys that change other tables when a row goes (ON DELETE CASCADE / SET NULL…). */
  readonly sideEffects: readonly string[];
  readonly warnings: readonly string[];
}

export const REVOKE_TRIGGER_NAME = 'token_reaper_notify_revoked';

const ID_TYPE_NAMES: Record<IdType, FragmentSqlToken> = {
  uuid: sql.fragment`uuid`,
  bigint: sql.fragment`bigint`,
  integer: sql.fragment`integer`,
  smallint: sql.fragment`smallint`,
  text: sql.fragment`text`,
  // A varchar column compares with text without a cast, and keeps its index.
  'character varying': sql.fragment`text`,
  // char(n) compares blank-padded: text would strip the index and the padding rules.
  character: sql.fragment`bpchar`,
};

/** The id column's type, for casting ids that arrive as text (from a payload, a record). */
export function idTypeOf(shape: Pick<TableShape, 'id'>): FragmentSqlToken {
  return ID_TYPE_NAMES[shape.id!.type];
}

/** The marker's column, whatever its kind. */
export function markerColumn(marker: Marker): string {
  return marker.kind === 'flag' ? marker.column : marker.time.column;
}

const relationRow = z.object({
  oid: z.number(),
  schema: z.string(),
  name: z.string(),
  kind: z.string(),
  rowSecurityApplies: z.boolean(),
});
const columnRow = z.object({
  name: z.string(),
  type: z.string(),
  baseType: z.string(),
  notNull: z.boolean(),
});
const leafRow = z.object({ schema: z.string(), name: z.string(), rowSecurityApplies: z.boolean() });
const referenceRow = z.object({
  constraint: z.string(),
  schema: z.string(),
  name: z.string(),
  columns: z.array(z.string()),
  referenced: z.array(z.string()),
  action: z.string(),
  deferrable: z.boolean(),
  nullable: z.boolean(),
});
const tableNameRow = z.object({ schema: z.string(), name: z.string() });

/** Whether row-level security filters this relation's rows for the current role. */
const ROW_SECURITY_APPLIES = sql.fragment`
  (c.relrowsecurity
   AND (c.relforcerowsecurity OR NOT pg_catalog.pg_has_role(c.relowner, 'USAGE'))
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                   WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls)))`;

export interface Inspection {
  readonly shapes: readonly TableShape[];
  /** Every problem of every target; empty when all can run. */
  readonly problems: readonly string[];
  /** Optional preset tables that are not there, and why that is fine. */
  readonly notes: readonly string[];
}

/** Every target, resolved and checked; never throws for a schema problem, it reports it. */
export async function inspectTargets(
  connection: CommonQueryMethods,
  config: Pick<Config, 'targets' | 'naiveTimestampsTimezone'>,
): Promise<Inspection> {
  await requirePrimary(connection);
  const shapes: TableShape[] = [];
  const problems: string[] = [];
  const notes: string[] = [];
  /** Each declared zone's problem (zoneProblem), or null: asked of the server once per run. */
  const zones = new Map<string, string | null>();
  const seen = new Map<string, string>();
  for (const rule of config.targets) {
    const result = await describeRule(connection, rule, config.naiveTimestampsTimezone, zones);
    if ('missing' in result) {
      if (rule.optional) notes.push(result.missing);
      else problems.push(result.missing);
    } else if ('problems' in result) {
      problems.push(...result.problems);
    } else {
      const name = qualifiedName(result.shape.relation);
      const earlier = seen.get(name);
      if (earlier !== undefined) {
        problems.push(
          `${rule.label} and ${earlier} both describe ${name}. Give each table one target.`,
        );
      } else {
        seen.set(name, rule.label);
        shapes.push(result.shape);
      }
    }
  }
  return { shapes, problems, notes };
}

/** Every target, described; a SchemaError lists every problem of every target. */
export async function describeTargets(
  connection: CommonQueryMethods,
  config: Pick<Config, 'targets' | 'naiveTimestampsTimezone'>,
): Promise<TableShape[]> {
  const inspection = await inspectTargets(connection, config);
  if (inspection.problems.length > 0) throw new SchemaError(inspection.problems);
  return [...inspection.shapes];
}

/** One target, described again (the sweep does this for every table, every time). */
export async function describeTarget(
  connection: CommonQueryMethods,
  rule: TargetRule,
  config: Pick<Config, 'naiveTimestampsTimezone'>,
): Promise<TableShape | null> {
  await requirePrimary(connection);
  const result = await describeRule(connection, rule, config.naiveTimestampsTimezone, new Map());
  if ('missing' in result) {
    if (rule.optional) return null;
    throw new SchemaError([result.missing]);
  }
  if ('problems' in result) throw new SchemaError(result.problems);
  return result.shape;
}

/**
 * The targets, described and checked for what running needs beyond their shape: a grace on a
 * boolean marker with no time column of its own keeps revocation times in
 * token_reaper.revocations, which install creates.
 */
export async function describeTargetsToRun(
  connection: CommonQueryMethods,
  config: Pick<Config, 'targets' | 'naiveTimestampsTimezone'>,
): Promise<TableShape[]> {
  const shapes = await describeTargets(connection, config);
  const needsRevocations = shapes.find(recordsRevocationTimes);
  if (
    needsRevocations &&
    !(await connection.exists(
      sql.unsafe`SELECT 1 WHERE to_regclass('token_reaper.revocations') IS NOT NULL`,
    ))
  ) {
    throw new SchemaError([
      `the grace on ${qualifiedName(needsRevocations.relation)} needs token_reaper.revocations to keep revocation times, because its "${markerColumn(needsRevocations.marker!)}" column has none. Run "token-reaper install" to create it.`,
    ]);
  }
  return shapes;
}

/**
 * Whether revocation times must be recorded in token_reaper.revocations: a boolean marker
 * with a grace and no time column to count it from.
 */
export function recordsRevocationTimes(shape: Pick<TableShape, 'marker'>): boolean {
  const marker = shape.marker;
  return marker?.kind === 'flag' && marker.graceSeconds > 0 && marker.graceFrom === null;
}

type Described = { shape: TableShape } | { problems: string[] } | { missing: string };

const zoneRow = z.object({ known: z.boolean(), abbreviation: z.boolean() });

/**
 * Why the server cannot read a timestamp without time zone in `zone`, or null. PostgreSQL reads
 * zone names case-insensitively ('utc' works). AT TIME ZONE looks a name up among the server's
 * abbreviations before its zones, so CET, EET, MET and WET read as fixed standard offsets all
 * year, while the zones of those names keep summer time: an auth service that writes them
 * would be read an hour off every summer. Such a name is refused; a fixed one (EST) reads the
 * same either way.
 */
async function zoneProblem(connection: CommonQueryMethods, zone: string): Promise<string | null> {
  const row = await connection.one(sql.type(zoneRow)`
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names WHERE lower(name) = lower(${zone})) AS known,
           EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_abbrevs WHERE lower(abbrev) = lower(${zone})) AS abbreviation
  `);
  if (!row.known) {
    return 'is not known to this PostgreSQL server (pg_timezone_names). Use a zone it knows, such as UTC.';
  }
  if (row.abbreviation && keepsSummerTime(zone)) {
    return `is read by PostgreSQL's AT TIME ZONE as the abbreviation ${zone.toUpperCase()}, one offset all year, while the zone of that name keeps summer time. Declare the zone by a city instead, such as Europe/Berlin for CET.`;
  }
  return null;
}

/** Whether `zone` has different offsets in January and July (Node's own zone data). */
function keepsSummerTime(zone: string): boolean {
  const offsetIn = (month: number) =>
    new Intl.DateTimeFormat('en-US', { timeZone: zone, timeZoneName: 'longOffset' })
      .formatToParts(Date.UTC(new Date().getUTCFullYear(), month, 1))
      .find((part) => part.type === 'timeZoneName')?.value;
  try {
    return offsetIn(0) !== offsetIn(6);
  } catch {
    return false; // a name Node does not know; the server knew it, and config checks the rest
  }
}

async function describeRule(
  connection: CommonQueryMethods,
  rule: TargetRule,
  naiveZone: string | null,
  zones: Map<string, string | null>,
): Promise<Described> {
  const found = await findTable(connection, rule);
  if ('missing' in found) return found;
  const { relation, warnings } = found;
  const where = qualifiedName(relation);
  const problems: string[] = [];
  if (relation.kind !== 'r' && relation.kind !== 'p') {
    return {
      problems: [
        `${where} is not a table (pg_class.relkind '${relation.kind}'). Set ${rule.knobs.table} to the table itself.`,
      ],
    };
  }

  const columns = await connection.any(sql.type(columnRow)`
    SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
           format_type(a.atttypid, NULL) AS "baseType", a.attnotnull AS "notNull"
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = ${relation.oid} AND a.attnum > 0 AND NOT a.attisdropped
  `);
  const byName = new Map(columns.map((column) => [column.name, column]));

  // A column named in the rule, or the one convention the table has.
  const pick = (choice: ColumnChoice, knob: string, role: string): string | null => {
    const present = choice.candidates.filter((name) => byName.has(name));
    if (present.length === 1) return present[0]!;
    if (present.length > 1) {
      problems.push(
        `${where} has both ${present.map((name) => `"${name}"`).join(' and ')}. Set ${knob} to the ${role} your auth service writes.`,
      );
    } else if (choice.configured) {
      problems.push(
        `${where} has no column "${choice.candidates[0]}"${nearColumns(choice.candidates[0]!, columns)}. Set ${knob} to the column that holds the ${role}.`,
      );
    } else {
      problems.push(
        `${where} has no column ${choice.candidates.map((name) => `"${name}"`).join(', ')}. Set ${knob} to the column that holds the ${role}.`,
      );
    }
    return null;
  };
  const needColumn = (name: string, knob: string) => {
    if (byName.has(name)) return true;
    problems.push(`${where} has no column "${name}"${nearColumns(name, columns)}. Fix ${knob}.`);
    return false;
  };

  // How a time column is read; a naive one needs a declared zone.
  const zone = rule.timezone ?? naiveZone;
  let readsNaive = false;
  const timeColumn = (
    name: string,
    knob: string,
    unit: 'seconds' | 'milliseconds' | null,
  ): TimeColumn | null => {
    const column = byName.get(name)!;
    if (column.baseType === TIMESTAMP_WITH_TIME_ZONE) {
      if (unit !== null) {
        problems.push(
          `${where}.${name} is ${column.type}, which needs no "unit". Remove it from ${knob}.`,
        );
      }
      return { column: name, type: column.type, reading: { kind: 'instant' } };
    }
    if (column.baseType === TIMESTAMP_WITHOUT_TIME_ZONE) {
      if (zone === null) {
        problems.push(
          `${where}.${name} is ${column.type}, which holds no time zone, and no zone is declared for it. Set ${rule.knobs.timezone === 'NAIVE_TIMESTAMPS_TIMEZONE' ? 'NAIVE_TIMESTAMPS_TIMEZONE' : `NAIVE_TIMESTAMPS_TIMEZONE (or ${rule.knobs.timezone})`} to the zone the auth service writes it in, usually UTC.`,
        );
        return null;
      }
      readsNaive = true;
      return { column: name, type: column.type, reading: { kind: 'naive', zone } };
    }
    if (EPOCH_TYPES.includes(column.baseType)) {
      if (unit === null) {
        problems.push(
          `${where}.${name} is ${column.type}. If it holds epoch time, say so in ${knob} with "unit": "seconds" or "milliseconds".`,
        );
        return null;
      }
      return { column: name, type: column.type, reading: { kind: 'epoch', unit } };
    }
    problems.push(
      `${where}.${name} is ${column.type}, not a time. Set ${knob} to a timestamptz, timestamp or epoch integer column.`,
    );
    return null;
  };

  let marker: Marker | null = null;
  if (rule.marker) {
    const name = pick(rule.marker.column, rule.knobs.marker, 'revoked or used marker');
    const column = name === null ? undefined : byName.get(name);
    if (name !== null && column !== undefined) {
      if (column.baseType === 'boolean') {
        let graceFrom: TimeColumn | null = null;
        if (
          rule.marker.graceFrom !== null &&
          needColumn(rule.marker.graceFrom, rule.knobs.marker)
        ) {
          graceFrom = timeColumn(rule.marker.graceFrom, rule.knobs.marker, null);
        }
        marker = {
          kind: 'flag',
          column: name,
          dead: rule.marker.dead ?? true,
          graceSeconds: rule.marker.graceSeconds,
          graceFrom,
        };
      } else if (
        column.baseType === TIMESTAMP_WITH_TIME_ZONE ||
        column.baseType === TIMESTAMP_WITHOUT_TIME_ZONE
      ) {
        if (rule.marker.dead !== null) {
          problems.push(
            `${where}.${name} is ${column.type}: a time marks the row dead once set, so "dead" does not apply. Remove it from ${rule.knobs.marker}.`,
          );
        }
        if (rule.marker.graceFrom !== null) {
          problems.push(
            `${where}.${name} is ${column.type}, whose grace counts from its own time; "graceFrom" is for a boolean marker. Remove it from ${rule.knobs.marker}.`,
          );
        }
        const time = timeColumn(name, rule.knobs.marker, null);
        if (time) marker = { kind: 'time', time, graceSeconds: rule.marker.graceSeconds };
      } else {
        problems.push(
          `${where}.${name} is ${column.type}; a marker is a boolean or a timestamp. Set ${rule.knobs.marker} to such a column.`,
        );
      }
    }
  }

  let expiry: Expiry | null = null;
  const rulesExpiry = rule.expiry;
  const unlessSet = rulesExpiry?.unlessSet ?? null;
  if (unlessSet !== null) needColumn(unlessSet, rule.knobs.expiry);
  if (rulesExpiry?.kind === 'column') {
    const name = pick(rulesExpiry.column, rule.knobs.expiry, 'expiry time');
    const time = name === null ? null : timeColumn(name, rule.knobs.expiry, rulesExpiry.unit);
    if (time) expiry = { kind: 'column', time, unlessSet };
  } else if (rulesExpiry && needColumn(rulesExpiry.from, rule.knobs.expiry)) {
    const from = timeColumn(rulesExpiry.from, rule.knobs.expiry, null);
    if (rulesExpiry.kind === 'lifetime') {
      if (from) {
        expiry = {
          kind: 'lifetime',
          from,
          lifetimeSeconds: rulesExpiry.lifetimeSeconds,
          unlessSet,
        };
      }
    } else if (needColumn(rulesExpiry.secondsColumn, rule.knobs.expiry)) {
      const seconds = byName.get(rulesExpiry.secondsColumn)!;
      if (!EPOCH_TYPES.includes(seconds.baseType)) {
        problems.push(
          `${where}.${rulesExpiry.secondsColumn} is ${seconds.type}, not a number of seconds. Fix ${rule.knobs.expiry}.`,
        );
      } else if (from) {
        expiry = {
          kind: 'lifetimeColumn',
          from,
          secondsColumn: rulesExpiry.secondsColumn,
          unlessSet,
        };
      }
    }
  }

  const notify = rule.notify ?? rule.marker !== null;
  if (notify && rule.marker === null) {
    problems.push(
      `${rule.label} asks for the revoke trigger ("notify"), but has no marker for it to watch. Remove "notify" or add a marker.`,
    );
  }

  // The id: configured, else `id`, else the primary key when it is one column.
  const idName =
    rule.id ?? (byName.has('id') ? 'id' : await primaryKeyColumn(connection, relation.oid));
  const needsId = notify || recordsRevocationTimes({ marker });
  let id: TableShape['id'] = null;
  if (idName !== null && byName.has(idName)) {
    const type = byName.get(idName)!.baseType;
    if ((ID_TYPES as readonly string[]).includes(type))
      id = { column: idName, type: type as IdType };
    else if (needsId) {
      problems.push(
        `${where}.${idName} is ${type}; the prompt purge handles ids of type ${ID_TYPES.join(', ')}. Set ${rule.knobs.id} to such a column.`,
      );
    }
  } else if (rule.id !== null) {
    needColumn(rule.id, rule.knobs.id);
  } else if (needsId) {
    problems.push(
      `${where} has no "id" column and no single-column primary key, and its rule needs one to name rows (the revoke trigger, revocation times). Set ${rule.knobs.id} to a unique column.`,
    );
  }

  if (zone !== null && readsNaive) {
    if (!zones.has(zone)) zones.set(zone, await zoneProblem(connection, zone));
    const problem = zones.get(zone);
    if (problem) {
      problems.push(`the time zone ${JSON.stringify(zone)} (${rule.knobs.timezone}) ${problem}`);
    }
  }

  const partitioned = relation.kind === 'p';
  const leaves = partitioned
    ? await connection.any(sql.type(leafRow)`
        SELECT n.nspname AS schema, c.relname AS name, ${ROW_SECURITY_APPLIES} AS "rowSecurityApplies"
        FROM pg_partition_tree(${relation.oid}::oid::regclass) tree
        JOIN pg_catalog.pg_class c ON c.oid = tree.relid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE tree.isleaf
        ORDER BY n.nspname, c.relname
      `)
    : [];

  // Row-level security: a DELETE by a role it applies to removes only the rows a policy lets it
  // see, which for a daemon is usually none, silently. (Deletes go to the leaves directly, so a
  // partitioned parent's policies do not apply; the leaves' own do.)
  for (const secured of partitioned
    ? leaves.filter((leaf) => leaf.rowSecurityApplies)
    : relation.rowSecurityApplies
      ? [relation]
      : []) {
    problems.push(
      `${qualifiedName(secured)} has row-level security enabled, and this role does not bypass it, so its deletes would silently remove nothing. Run token-reaper as the table's owner or as a role with BYPASSRLS (ALTER ROLE … BYPASSRLS).`,
    );
  }

  const { references, sideEffects } = await readReferences(
    connection,
    relation.oid,
    rule,
    where,
    problems,
  );

  // Dropping a partition whole needs every row in it expired by its bound alone.
  const expiryColumn =
    expiry?.kind === 'column' && expiry.time.reading.kind !== 'epoch' && expiry.unlessSet === null
      ? expiry.time.column
      : null;
  const partitionedByExpiry =
    partitioned &&
    expiryColumn !== null &&
    (await connection.exists(sql.unsafe`
      SELECT 1 FROM pg_catalog.pg_partitioned_table pt
      JOIN pg_catalog.pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
      WHERE pt.partrelid = ${relation.oid} AND pt.partstrat = 'r' AND pt.partnatts = 1
        AND a.attname = ${expiryColumn}
        AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                        JOIN pg_catalog.pg_class child ON child.oid = i.inhrelid
                        WHERE i.inhparent = pt.partrelid AND child.relkind = 'p')
    `));

  const revokeTriggerInstalled = await connection.exists(sql.unsafe`
    SELECT 1 FROM pg_catalog.pg_trigger
    WHERE tgrelid = ${relation.oid} AND tgname = ${REVOKE_TRIGGER_NAME} AND NOT tgisinternal
  `);

  if (problems.length > 0) return { problems };
  const self: Relation = { schema: relation.schema, name: relation.name };
  return {
    shape: {
      rule,
      relation: self,
      partitioned,
      partitionedByExpiry,
      leaves: partitioned ? leaves.map(({ schema, name }) => ({ schema, name })) : [self],
      id,
      marker,
      expiry,
      keepExpiredForSeconds: rule.keepExpiredForSeconds,
      notify,
      revokeTriggerInstalled,
      references,
      sideEffects,
      warnings,
    },
  };
}

const schemaRow = z.object({ schema: z.string() });

/**
 * The rule with its table fixed to the relation it resolved to: a daemon resolves each name
 * once, at start, and describes that relation from then on, whatever the search_path of a
 * later connection says (an ALTER DATABASE … SET search_path must not move the sweep to
 * another table while the purge stays on the first).
 */
export function pinnedRule(shape: Pick<TableShape, 'rule' | 'relation'>): TargetRule {
  return {
    ...shape.rule,
    table: {
      candidates: [{ schema: shape.relation.schema, name: shape.relation.name }],
      configured: true,
    },
  };
}

/**
 * The first of the rule's table names that exists. A configured name that does not is a
 * problem with a "did you mean" when a table of a similar name exists; a convention that
 * finds nothing lists what it looked for.
 */
async function findTable(
  connection: CommonQueryMethods,
  rule: TargetRule,
): Promise<{ relation: z.infer<typeof relationRow>; warnings: string[] } | { missing: string }> {
  const found: z.infer<typeof relationRow>[] = [];
  for (const candidate of rule.table.candidates) {
    // format('%I') quotes the name, so to_regclass resolves it exactly as written, through
    // the search_path when it has no schema.
    const text =
      candidate.schema === null
        ? sql.fragment`format('%I', ${candidate.name}::text)`
        : sql.fragment`format('%I.%I', ${candidate.schema}::text, ${candidate.name}::text)`;
    const relation = await connection.maybeOne(sql.type(relationRow)`
      SELECT c.oid::int AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
             ${ROW_SECURITY_APPLIES} AS "rowSecurityApplies"
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      WHERE c.oid = to_regclass(${text})
    `);
    if (relation) found.push(relation);
  }
  if (found.length > 0) {
    const warnings =
      found.length > 1
        ? [
            `${found.map((relation) => qualifiedName(relation)).join(' and ')} both match the conventional names; ${qualifiedName(found[0]!)} is used. Set ${rule.knobs.table} to choose.`,
          ]
        : [];
    const chosen = found[0]!;
    const unqualified = rule.table.candidates.some(
      (candidate) => candidate.schema === null && candidate.name === chosen.name,
    );
    if (unqualified) {
      const shadowed = await connection.anyFirst(sql.type(schemaRow)`
        SELECT n.nspname AS schema
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname = ${chosen.name} AND c.oid <> ${chosen.oid}
          AND c.relkind IN ('r', 'p', 'v', 'f')
          AND n.nspname = ANY (current_schemas(false))
      `);
      if (shadowed.length > 0) {
        warnings.push(
          `${chosen.name} is in more than one schema on the search_path: ${qualifiedName(chosen)} is used, and ${shadowed.map((schema) => qualifiedName({ schema, name: chosen.name })).join(', ')} is not. Write the schema in ${rule.knobs.table} (for example ${qualifiedName(chosen)}) to choose.`,
        );
      }
    }
    return { relation: chosen, warnings };
  }
  const names = rule.table.candidates.map(formatName);
  const suggestions = await nearTables(connection, rule.table.candidates);
  const hint =
    suggestions.length > 0
      ? ` Did you mean ${suggestions.map((name) => `"${name}"`).join(' or ')}? Set ${rule.knobs.table} to it.`
      : rule.optional
        ? ' That is fine when the deployment does not use it.'
        : ` Create it, or set ${rule.knobs.table} to the table that holds the ${rule.label}${rule.knobs.disable ? `, or set ${rule.knobs.disable} if there is none` : ''}.`;
  const what = rule.table.configured
    ? `table ${names[0]} does not exist (or is not on the search_path of this connection).`
    : `table ${names[0]} does not exist, nor ${names.slice(1).join(', ')}.`;
  return { missing: `${rule.label}: ${what}${hint}` };
}

function formatName(name: QualifiedName) {
  return name.schema === null ? name.name : `${name.schema}.${name.name}`;
}

/** Folds the spellings ORMs give one name: RefreshToken, refresh_tokens, refreshTokens. */
function foldName(name: string) {
  return name.toLowerCase().replace(/_/g, '').replace(/s$/, '');
}

/** Tables (in any schema but the system's) whose folded name is that of a candidate. */
async function nearTables(
  connection: CommonQueryMethods,
  candidates: readonly QualifiedName[],
): Promise<string[]> {
  const tables = await connection.any(sql.type(tableNameRow)`
    SELECT n.nspname AS schema, c.relname AS name
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'token_reaper')
      AND n.nspname NOT LIKE 'pg\\_%'
    ORDER BY n.nspname, c.relname
  `);
  const wanted = new Set(candidates.map((candidate) => foldName(candidate.name)));
  const near = tables.filter((table) => wanted.has(foldName(table.name)));
  // A schema that was named narrows the suggestions to it, when it has any.
  const schemas = new Set(candidates.map((candidate) => candidate.schema));
  const inSchema = near.filter((table) => schemas.has(table.schema));
  return (inSchema.length > 0 ? inSchema : near).map((table) =>
    table.schema === 'public' ? table.name : `${table.schema}.${table.name}`,
  );
}

function nearColumns(name: string, columns: readonly { name: string }[]) {
  const near = columns.filter((column) => foldName(column.name) === foldName(name));
  return near.length > 0 ? ` (did you mean "${near[0]!.name}"?)` : '';
}

async function primaryKeyColumn(connection: CommonQueryMethods, oid: number) {
  const keys = await connection.anyFirst(sql.type(z.object({ name: z.string() }))`
    SELECT a.attname AS name
    FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
    WHERE i.indrelid = ${oid} AND i.indisprimary
  `);
  return keys.length === 1 ? keys[0]! : null;
}

/**
 * Foreign keys into the table. Those without ON DELETE (NO ACTION, RESTRICT) would make a
 * delete of a referenced dead row fail, at once or at commit (Django's keys are DEFERRABLE
 * INITIALLY DEFERRED), taking its whole batch with it: the rule must say to keep such rows or
 * to unlink them. ON DELETE CASCADE deletes rows of another table, which the rule must allow.
 */
async function readReferences(
  connection: CommonQueryMethods,
  oid: number,
  rule: TargetRule,
  where: string,
  problems: string[],
): Promise<{ references: Reference[]; sideEffects: string[] }> {
  const rows = await connection.any(sql.type(referenceRow)`
    SELECT con.conname AS constraint, n.nspname AS schema, c.relname AS name,
           ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, position)
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                 ORDER BY k.position) AS columns,
           ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, position)
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
                 ORDER BY k.position) AS referenced,
           con.confdeltype::text AS action, con.condeferrable AS deferrable,
           NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                       WHERE a.attrelid = con.conrelid AND a.attnum = ANY (con.conkey) AND a.attnotnull)
             AS nullable
    FROM pg_catalog.pg_constraint con
    JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE con.contype = 'f' AND con.confrelid = ${oid} AND con.conparentid = 0
    ORDER BY n.nspname, c.relname, con.conname
  `);
  const references: Reference[] = [];
  const sideEffects: string[] = [];
  for (const row of rows) {
    const from = { schema: row.schema, name: row.name };
    const described = `${qualifiedName(from)}(${row.columns.join(', ')}) → ${where}(${row.referenced.join(', ')}), constraint ${row.constraint}`;
    if (row.action === 'c') {
      if (rule.allowCascade)
        sideEffects.push(
          `deleting a row also deletes the rows of ${described} (ON DELETE CASCADE)`,
        );
      else {
        problems.push(
          `deleting from ${where} would cascade into ${qualifiedName(from)} through ${described} (ON DELETE CASCADE). Set "allowCascade": true on ${rule.label} if those rows should go too.`,
        );
      }
    } else if (row.action === 'n' || row.action === 'd') {
      sideEffects.push(
        `deleting a row sets ${qualifiedName(from)}(${row.columns.join(', ')}) to ${row.action === 'n' ? 'NULL' : 'its default'} (${described})`,
      );
    } else if (rule.onReferenced === 'keep') {
      references.push({
        constraint: row.constraint,
        from,
        columns: row.columns,
        referenced: row.referenced,
        handling: 'keep',
      });
    } else if (rule.onReferenced === 'unlink' && row.nullable && row.action === 'a') {
      references.push({
        constraint: row.constraint,
        from,
        columns: row.columns,
        referenced: row.referenced,
        handling: 'unlink',
      });
      sideEffects.push(
        `deleting a row sets ${qualifiedName(from)}(${row.columns.join(', ')}) to NULL (${described}, unlinked by token-reaper)`,
      );
    } else {
      const when = row.deferrable ? 'at commit (the key is DEFERRABLE)' : 'at once';
      const unlink =
        row.nullable && row.action === 'a'
          ? ' or "unlink" (the reference is set to NULL in the same statement, as an ORM with on_delete=SET_NULL does)'
          : '';
      problems.push(
        `${described} has no ON DELETE action, so deleting a referenced dead row fails ${when} and takes its batch with it. In a targets file, set "onReferenced" on ${rule.label} to "keep" (such rows stay until unreferenced)${unlink}.`,
      );
    }
  }
  return { references, sideEffects };
}

/** The time column an expiry is read from: the expiry column, or the one a lifetime counts from. */
export function expiryTimeColumn(expiry: Expiry): TimeColumn {
  return expiry.kind === 'column' ? expiry.time : expiry.from;
}

/** The expiry column, when the rule's expiry is a column (the key of partitioning by expiry). */
export function expiryColumnName(shape: Pick<TableShape, 'expiry'>): string | null {
  return shape.expiry?.kind === 'column' ? shape.expiry.time.column : null;
}
