// partition convert's plan (see convert.ts) as SQL: the concurrent index builds, the
// CHECK that lets ATTACH PARTITION skip its scan, and the swap. The plan is computed from the
// catalog and the database clock before anything changes, so `--print` shows exactly what a
// run executes, and a refusal (exit 2) comes before the first statement.
import pg from 'pg';
import { sql, type DatabasePool } from 'slonik';
import { z } from 'zod';
import type { Config, PartitionConfig } from '../config.js';
import { SchemaError } from '../errors.js';
import {
  describeTarget,
  expiryColumnName,
  qualifiedName,
  type Relation,
  type TableShape,
} from '../schema.js';
import {
  keyReading,
  PREMAKE_MARGIN_DAYS,
  partitionName,
  premakeHorizonDays,
} from '../sweep/partitions.js';
import {
  conversionNames,
  keyIndexName,
  readTableFacts,
  twinNames,
  type GrantFacts,
  type TableFacts,
  type TriggerFacts,
} from './table-facts.js';

const { escapeIdentifier, escapeLiteral } = pg;

const DAY_MS = 86_400_000;
/** The sweep's margin on top of the longest token lifetime stored (see planPartitions). */
/**
 * Up to this many heap pages (1 MB), the table gets no CHECK: ATTACH scans it under the lock in
 * about a millisecond, and a bound read from so few rows could not be trusted anyway (an empty
 * table says nothing about how long its tokens will live).
 */
const SCAN_UNDER_LOCK_MAXIMUM_PAGES = 128;
/**
 * Every statement of the swap is a catalog change that takes milliseconds. One that runs this
 * long is scanning, which the plan is built to avoid; rolling back beats stalling the auth
 * service behind the lock.
 */
const SWAP_STATEMENT_TIMEOUT_MS = 5_000;

interface IndexBuild {
  sql: string;
  index: { schema: string; name: string };
}

export interface ConversionPlan {
  facts: TableFacts;
  table: string;
  legacy: Relation;
  /** Epoch milliseconds: the legacy partition holds every expiry below it. */
  bound: number;
  indexBuilds: IndexBuild[];
  /** Null when the table is small enough for ATTACH to scan it under the lock. */
  check: { name: string; add: string; validate: string; drop: string } | null;
  lock: string;
  swap: string[];
  partitionsCreated: string[];
  warnings: string[];
  /** Reasons to refuse that only the plan shows (the bound); facts.problems has the rest. */
  problems: string[];
}

/**
 * Plans every configured target that is a plain table; a table already partitioned is
 * skipped. Refuses (SchemaError, exit 2) before anything changes, with every problem of every
 * table, or when no table is left to convert.
 */
export async function planConversions(
  pool: DatabasePool,
  config: Config,
): Promise<{ plans: ConversionPlan[]; skipped: string[] }> {
  const plans: ConversionPlan[] = [];
  const skipped: string[] = [];
  const problems: string[] = [];
  for (const rule of config.targets) {
    const shape = await describeTarget(pool, rule, config);
    if (shape === null) continue;
    if (expiryColumnName(shape) === null) {
      skipped.push(
        `${qualifiedName(shape.relation)} has no expiry column to partition by (its rule ${shape.expiry === null ? 'has no expiry' : 'computes the expiry from another column'}).`,
      );
      continue;
    }
    if (shape.partitioned) {
      skipped.push(
        `${qualifiedName(shape.relation)} is already partitioned${shape.partitionedByExpiry ? ` by ${expiryColumnName(shape)!}, and the sweep drops its expired partitions` : ''}: there is nothing to convert.`,
      );
      continue;
    }
    const plan = await planTable(pool, shape, config.sweep.partitions);
    if (typeof plan === 'string') problems.push(plan);
    else plans.push(plan);
  }
  if (problems.length > 0) throw new SchemaError(problems);
  if (plans.length === 0) throw new SchemaError(skipped);
  return { plans, skipped };
}

/** The plan for one plain table, or its problems, one per line. */
export async function planTable(
  pool: DatabasePool,
  shape: TableShape,
  settings: PartitionConfig,
): Promise<ConversionPlan | string> {
  const facts = await readTableFacts(pool, shape);
  if (facts.problems.length > 0) return facts.problems.join('\n');
  const plan = planConversion(facts, settings, await boundWriter(pool, facts, settings));
  return plan.problems.length > 0 ? plan.problems.join('\n') : plan;
}

/** How the plan writes a bound (always a UTC midnight, in epoch ms) for the key's type. */
interface BoundWriter {
  literal(epochMs: number): string;
  /** The key's type, for the CHECK's literal. */
  cast: 'timestamptz' | 'timestamp';
}

/**
 * An instant is written as itself. A naive key holds wall-clock times in the declared zone,
 * so each UTC midnight the plan can use is read in that zone by the database, once, before
 * planning: the conversion is the database's, like every other reading of the column.
 */
async function boundWriter(
  pool: DatabasePool,
  facts: TableFacts,
  settings: PartitionConfig,
): Promise<BoundWriter> {
  const reading = keyReading(facts.shape);
  if (reading.kind !== 'naive') return { literal: timestampLiteral, cast: 'timestamptz' };
  const { now } = facts.clock;
  const longestMs = Math.max(0, (facts.clock.latest ?? now) - now);
  const lifetimeMs = Math.max(longestMs, (settings.premakeDays ?? 0) * DAY_MS);
  const horizonMs = premakeHorizonDays(settings.premakeDays, longestMs) * DAY_MS;
  // Every midnight planConversion can reach: the bound, and the days from it to the horizon.
  const first = Math.floor(now / DAY_MS) * DAY_MS;
  const last = first + Math.max(lifetimeMs + 3 * DAY_MS, horizonMs + 2 * DAY_MS);
  const rows = await pool.any(sql.type(z.object({ epochMs: z.number(), wallClock: z.string() }))`
    SELECT midnight::float8 AS "epochMs",
           to_char(to_timestamp(midnight / 1000.0) AT TIME ZONE ${reading.zone}::text,
                   'YYYY-MM-DD HH24:MI:SS') AS "wallClock"
    FROM generate_series(${first}::bigint, ${last}::bigint, ${DAY_MS}::bigint) midnight
  `);
  const wallClock = new Map(rows.map((row) => [row.epochMs, row.wallClock]));
  return {
    literal(epochMs) {
      const text = wallClock.get(epochMs);
      if (text === undefined) throw new Error(`no wall-clock reading for ${epochMs}`);
      return escapeLiteral(text);
    },
    cast: 'timestamp',
  };
}

function planConversion(
  facts: TableFacts,
  settings: PartitionConfig,
  bounds: BoundWriter,
): ConversionPlan {
  const { shape } = facts;
  const { schema } = shape.relation;
  const names = conversionNames(shape);
  const table = quote(shape.relation);
  const legacyRelation = { schema, name: names.legacy };
  const legacy = quote(legacyRelation);
  const expiry = escapeIdentifier(expiryColumnName(shape)!);
  const warnings: string[] = [];
  const problems: string[] = [];
  const where = qualifiedName(shape.relation);

  // The bound. Rows the auth service inserts between adding the CHECK and the swap must lie
  // below it, or the CHECK fails their INSERT. Tokens live for a bounded time, and the longest
  // life left among the stored tokens is about that time: the auth service issues tokens all
  // day long. So the bound sits a day beyond the latest expiry stored (or beyond
  // PARTITION_PREMAKE_DAYS, the operator's statement of the longest lifetime, when that is
  // later), rounded up to the next UTC midnight. A token issued before the swap expires about
  // one lifetime after it was issued: a day and more before the bound. The swap follows within
  // seconds; if it fails, the CHECK is removed again (see convertTable in convert.ts).
  const { now } = facts.clock;
  const longestMs = Math.max(0, (facts.clock.latest ?? now) - now);
  const lifetimeMs = Math.max(longestMs, (settings.premakeDays ?? 0) * DAY_MS);
  const bound = (Math.floor((now + lifetimeMs + DAY_MS) / DAY_MS) + 1) * DAY_MS;
  const useCheck = facts.heapPages > SCAN_UNDER_LOCK_MAXIMUM_PAGES;
  if (longestMs === 0 && settings.premakeDays === null) {
    const advice = `Set PARTITION_PREMAKE_DAYS to at least the longest lifetime of its rows, in days`;
    if (useCheck) {
      // A big table whose rows have all expired tells nothing about how long new ones live.
      problems.push(
        `no row of ${where} expires in the future, so the bound cannot be read from the table, and a new row could expire after it and fail to insert. ${advice}.`,
      );
    } else {
      warnings.push(
        `no row of ${where} expires in the future, so partitions are made only ${PREMAKE_MARGIN_DAYS} days ahead, and a row that expires later than that would fail to insert. ${advice}.`,
      );
    }
  }
  const horizonDays = premakeHorizonDays(settings.premakeDays, longestMs);
  // At least one daily partition: the sweep continues the grid of the newest bounded one.
  const days: number[] = [];
  let lower = bound;
  do {
    days.push(lower);
    lower += DAY_MS;
  } while (lower < now + horizonDays * DAY_MS);
  if ((facts.storageParameters ?? []).length > 0) {
    warnings.push(
      `${where} has storage parameters (${facts.storageParameters!.join(', ')}); a partitioned table cannot have any, and the new partitions do not get them. Set them on each partition if they matter.`,
    );
  }

  const primaryKey = facts.indexes.find((index) => index.primary)!;
  const keyHasExpiry = primaryKey.keyColumns.includes(expiryColumnName(shape)!);
  const keyColumns = keyHasExpiry
    ? primaryKey.keyColumns
    : [...primaryKey.keyColumns, expiryColumnName(shape)!];
  const keyIndex = keyIndexName(shape, primaryKey.keyColumns);
  const primaryKeyName = primaryKey.constraintName ?? primaryKey.name;
  const columnList = keyColumns.map(escapeIdentifier).join(', ');
  const indexBuilds: IndexBuild[] = [];
  const legacyKeyStatements: string[] = [];
  const renames: string[] = [];
  const parentIndexes: string[] = [
    `ALTER TABLE ${table} ADD CONSTRAINT ${escapeIdentifier(primaryKeyName)} PRIMARY KEY (${columnList});`,
  ];
  const legacyPrimaryKey = escapeIdentifier(names.legacyIndex(primaryKeyName));
  if (keyHasExpiry) {
    renames.push(
      `ALTER INDEX ${quote({ schema, name: primaryKey.name })} RENAME TO ${legacyPrimaryKey};`,
    );
  } else {
    indexBuilds.push({
      sql: `CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ${escapeIdentifier(keyIndex)} ON ${table} (${columnList});`,
      index: { schema, name: keyIndex },
    });
    // The constraint takes the index, renaming it; the old key's index goes with its constraint.
    legacyKeyStatements.push(
      `ALTER TABLE ${legacy} DROP CONSTRAINT ${escapeIdentifier(primaryKeyName)}, ADD CONSTRAINT ${legacyPrimaryKey} PRIMARY KEY USING INDEX ${escapeIdentifier(keyIndex)};`,
    );
  }

  const twins = new Set(facts.indexes.map((index) => twinNames(shape, index).twin));
  const others = facts.indexes.filter(
    (index) => !index.primary && index.name !== keyIndex && !twins.has(index.name),
  );
  for (const index of others) {
    const tail = index.definitionTail!;
    renames.push(
      `ALTER INDEX ${quote({ schema, name: index.name })} RENAME TO ${escapeIdentifier(names.legacyIndex(index.name))};`,
    );
    if (!index.unique) {
      parentIndexes.push(`CREATE INDEX ${escapeIdentifier(index.name)} ON ${table} ${tail};`);
    } else if (index.keyColumns.includes(expiryColumnName(shape)!)) {
      parentIndexes.push(
        index.constraintName !== null
          ? `ALTER TABLE ${table} ADD CONSTRAINT ${escapeIdentifier(index.constraintName)} ${index.constraintDefinition};`
          : `CREATE UNIQUE INDEX ${escapeIdentifier(index.name)} ON ${table} ${tail};`,
      );
    } else if (!others.some((other) => !other.unique && other.definitionTail === tail)) {
      // A plain index with the same definition already serves the lookups otherwise.
      const { parent, twin } = twinNames(shape, index);
      indexBuilds.push({
        sql: `CREATE INDEX CONCURRENTLY IF NOT EXISTS ${escapeIdentifier(twin)} ON ${table} ${tail};`,
        index: { schema, name: twin },
      });
      parentIndexes.push(`CREATE INDEX ${escapeIdentifier(parent)} ON ${table} ${tail};`);
    }
  }

  const boundLiteral = bounds.literal(bound);
  const check = useCheck
    ? {
        name: names.check,
        // Dropped first: an earlier run that stopped may have left one with another bound.
        add: `ALTER TABLE ${table} DROP CONSTRAINT IF EXISTS ${escapeIdentifier(names.check)}, ADD CONSTRAINT ${escapeIdentifier(names.check)} CHECK (${expiry} < ${boundLiteral}::${bounds.cast}) NOT VALID;`,
        validate: `ALTER TABLE ${table} VALIDATE CONSTRAINT ${escapeIdentifier(names.check)};`,
        drop: `ALTER TABLE ${table} DROP CONSTRAINT IF EXISTS ${escapeIdentifier(names.check)};`,
      }
    : null;

  const changeOwner = facts.owner !== facts.currentUser;
  const owner = escapeIdentifier(facts.owner);
  const partitionsCreated: string[] = [];
  const partitionStatements = days.flatMap((lower) => {
    const partition = { schema, name: partitionName(shape.relation.name, lower, DAY_MS) };
    partitionsCreated.push(qualifiedName(partition));
    return [
      `CREATE TABLE ${quote(partition)} PARTITION OF ${table} FOR VALUES FROM (${bounds.literal(lower)}) TO (${bounds.literal(lower + DAY_MS)});`,
      ...(changeOwner ? [`ALTER TABLE ${quote(partition)} OWNER TO ${owner};`] : []),
    ];
  });

  const swap = [
    `ALTER TABLE ${table} RENAME TO ${escapeIdentifier(names.legacy)};`,
    ...legacyKeyStatements,
    ...renames,
    // The columns in the same order, with their types, collations, NOT NULLs, defaults
    // (nextval of a serial's sequence included), generation expressions, storage and
    // compression, and comments. Not INCLUDING CONSTRAINTS: that would copy the bound's CHECK
    // and make every later token fail; the other CHECKs are added one by one. Not INCLUDING
    // INDEXES: the indexes are added below under names of their own, adopting the legacy
    // table's. Identity columns are refused before this.
    `CREATE TABLE ${table} (LIKE ${legacy} INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION INCLUDING COMMENTS) PARTITION BY RANGE (${expiry});`,
    ...(changeOwner ? [`ALTER TABLE ${table} OWNER TO ${owner};`] : []),
    ...facts.checks.map(
      (constraint) =>
        `ALTER TABLE ${table} ADD CONSTRAINT ${escapeIdentifier(constraint.name)} ${constraint.definition};`,
    ),
    ...facts.ownedSequences.map(
      (sequence) =>
        `ALTER SEQUENCE ${quote(sequence)} OWNED BY ${table}.${escapeIdentifier(sequence.column)};`,
    ),
    `ALTER TABLE ${table} ATTACH PARTITION ${legacy} FOR VALUES FROM (MINVALUE) TO (${boundLiteral});`,
    // The partition's own bound says the same from now on.
    `ALTER TABLE ${legacy} DROP CONSTRAINT IF EXISTS ${escapeIdentifier(names.check)};`,
    ...parentIndexes,
    // A row trigger on the partitioned table is cloned onto every partition, so the legacy
    // partition's own copy goes first. The definition names the table the parent now is.
    ...facts.triggers.flatMap((trigger) => [
      `DROP TRIGGER ${escapeIdentifier(trigger.name)} ON ${legacy};`,
      `${trigger.definition};`,
      ...triggerState(table, trigger),
    ]),
    ...partitionStatements,
    ...facts.grants.map((grant) => grantStatement(table, grant)),
  ];

  return {
    facts,
    table: where,
    legacy: legacyRelation,
    bound,
    indexBuilds,
    check,
    lock: `LOCK TABLE ${table} IN ACCESS EXCLUSIVE MODE;`,
    swap,
    partitionsCreated,
    warnings,
    problems,
  };
}

function triggerState(table: string, trigger: TriggerFacts): string[] {
  const name = escapeIdentifier(trigger.name);
  switch (trigger.enabled) {
    case 'D':
      return [`ALTER TABLE ${table} DISABLE TRIGGER ${name};`];
    case 'R':
      return [`ALTER TABLE ${table} ENABLE REPLICA TRIGGER ${name};`];
    case 'A':
      return [`ALTER TABLE ${table} ENABLE ALWAYS TRIGGER ${name};`];
    default:
      return [];
  }
}

function grantStatement(table: string, grant: GrantFacts) {
  const column = grant.column === null ? '' : ` (${escapeIdentifier(grant.column)})`;
  const grantee = grant.grantee === null ? 'PUBLIC' : escapeIdentifier(grant.grantee);
  return `GRANT ${grant.privilege}${column} ON TABLE ${table} TO ${grantee}${grant.grantable ? ' WITH GRANT OPTION' : ''};`;
}

function quote(relation: Relation) {
  return `${escapeIdentifier(relation.schema)}.${escapeIdentifier(relation.name)}`;
}

function timestampLiteral(epochMs: number) {
  return escapeLiteral(new Date(epochMs).toISOString());
}

export function shortLockSettings(settings: PartitionConfig) {
  return `SET LOCAL lock_timeout = '${settings.lockTimeoutMs}ms';`;
}

export function swapPreamble(settings: PartitionConfig) {
  return [
    'BEGIN;',
    shortLockSettings(settings),
    `SET LOCAL statement_timeout = '${SWAP_STATEMENT_TIMEOUT_MS}ms';`,
  ];
}

/** The plans as one SQL script, for review: exactly what a run executes, bound included. */
export function formatPlans(
  plans: readonly ConversionPlan[],
  skipped: readonly string[],
  settings: PartitionConfig,
): string {
  const parts = [
    [
      '-- token-reaper partition convert plan: the SQL `token-reaper partition convert` runs, in order.',
      ...skipped.map((reason) => `-- Skipped: ${reason}`),
    ].join('\n'),
  ];
  for (const plan of plans) {
    const lines = [
      `-- ${plan.table} becomes partitioned by day of ${expiryColumnName(plan.facts.shape)!}; the table itself becomes the partition ${qualifiedName(plan.legacy)}, without a copy.`,
      `-- The bound ${new Date(plan.bound).toISOString()} was computed now, on the database clock, from the latest expiry stored; a run computes it again.`,
      ...plan.warnings.map((warning) => `-- Warning: ${warning}`),
    ];
    if (plan.indexBuilds.length > 0) {
      lines.push(
        '',
        '-- 1. Online: the indexes the partitioned table needs (outside a transaction: CREATE INDEX CONCURRENTLY cannot run in one).',
        ...plan.indexBuilds.map((build) => build.sql),
      );
    }
    if (plan.check) {
      lines.push(
        '',
        '-- 2. Online: prove that every row lies below the bound, so that ATTACH PARTITION needs no scan.',
        'BEGIN;',
        shortLockSettings(settings),
        plan.check.add,
        'COMMIT;',
        plan.check.validate,
      );
    } else {
      lines.push(
        '',
        '-- 2. The table is small: ATTACH PARTITION checks its rows under the lock, in about a millisecond.',
      );
    }
    lines.push(
      '',
      `-- 3. The swap, in one short transaction; token-reaper retries it (${settings.lockAttempts} attempts) when the lock does not come within lock_timeout.`,
      ...swapPreamble(settings),
      plan.lock,
      ...plan.swap,
      'COMMIT;',
    );
    parts.push(lines.join('\n'));
  }
  return `${parts.join('\n\n')}\n`;
}
