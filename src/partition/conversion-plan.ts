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
  relationIdentifier,
  type Relation,
  type TableShape,
} from '../schema.js';
import {
  keyReading,
  LONGEST_INFERRED_LIFETIME_DAYS,
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
  const days = conversionDays(facts, settings);
  const bounds = await boundWriter(pool, facts, [...days.starts, days.starts.at(-1)! + DAY_MS]);
  const rowsFromBound = await countRowsFromBound(pool, facts, bounds.text(days.bound));
  const plan = planConversion(facts, settings, days, bounds, rowsFromBound);
  return plan.problems.length > 0 ? plan.problems.join('\n') : plan;
}

/** Where the legacy partition ends and the daily partitions that follow it; UTC midnights. */
interface ConversionDays {
  /** The longest token lifetime stored, in milliseconds (see readLongestLifetime). */
  longestMs: number;
  /** Epoch milliseconds: the legacy partition holds every expiry below it. */
  bound: number;
  /** The start of each daily partition, in epoch milliseconds, the bound first. */
  starts: number[];
}

function conversionDays(facts: TableFacts, settings: PartitionConfig): ConversionDays {
  // The bound. Rows the auth service inserts between adding the CHECK and the swap must lie
  // below it, or the CHECK fails their INSERT. Tokens live for a bounded time, and the longest
  // life left among the stored tokens is about that time: the auth service issues tokens all
  // day long. So the bound sits a day beyond the latest expiry stored (or beyond
  // PARTITION_PREMAKE_DAYS, the operator's statement of the longest lifetime, when that is
  // later), rounded up to the next UTC midnight. A token issued before the swap expires about
  // one lifetime after it was issued: a day and more before the bound. The swap follows within
  // seconds; if it fails, the CHECK is removed again (see convertTable in convert.ts). An
  // expiry that is no lifetime ('infinity', '9999-12-31') lies beyond the bound: see
  // planConversion.
  const { now, longestLifetimeMs: longestMs } = facts.clock;
  const lifetimeMs = Math.max(longestMs, (settings.premakeDays ?? 0) * DAY_MS);
  const bound = (Math.floor((now + lifetimeMs + DAY_MS) / DAY_MS) + 1) * DAY_MS;
  const horizonDays = premakeHorizonDays(settings.premakeDays, longestMs);
  // At least one daily partition: the sweep continues the grid of the newest bounded one.
  const starts: number[] = [];
  let lower = bound;
  do {
    starts.push(lower);
    lower += DAY_MS;
  } while (lower < now + horizonDays * DAY_MS);
  return { longestMs, bound, starts };
}

/** How the plan writes a bound (always a UTC midnight, in epoch ms) for the key's type. */
interface BoundWriter {
  /** The bound as the key's type reads it, for a query parameter. */
  text(epochMs: number): string;
  /** The same as an SQL literal, for the plan's statements. */
  literal(epochMs: number): string;
  /** The key's type, for the CHECK's literal. */
  cast: 'timestamptz' | 'timestamp';
}

/**
 * An instant is written as itself. A naive key holds wall-clock times in the declared zone,
 * so each UTC midnight the plan uses is read in that zone by the database, once, before
 * planning: the conversion is the database's, like every other reading of the column.
 */
async function boundWriter(
  pool: DatabasePool,
  facts: TableFacts,
  midnights: readonly number[],
): Promise<BoundWriter> {
  const reading = keyReading(facts.shape);
  if (reading.kind !== 'naive') {
    const text = (epochMs: number) => new Date(epochMs).toISOString();
    return { text, literal: (epochMs) => escapeLiteral(text(epochMs)), cast: 'timestamptz' };
  }
  const rows = await pool.any(sql.type(z.object({ epochMs: z.number(), wallClock: z.string() }))`
    SELECT midnight AS "epochMs",
           to_char(to_timestamp(midnight / 1000.0) AT TIME ZONE ${reading.zone}::text,
                   'YYYY-MM-DD HH24:MI:SS') AS "wallClock"
    FROM unnest(${sql.array(midnights, 'float8')}) midnight
  `);
  const wallClock = new Map(rows.map((row) => [row.epochMs, row.wallClock]));
  const text = (epochMs: number) => {
    const found = wallClock.get(epochMs);
    if (found === undefined) throw new Error(`no wall-clock reading for ${epochMs}`);
    return found;
  };
  return { text, literal: (epochMs) => escapeLiteral(text(epochMs)), cast: 'timestamp' };
}

/**
 * The rows that expire at or after the bound: 'infinity', a far-off date that means "never",
 * or a token that lives longer than LONGEST_INFERRED_LIFETIME_DAYS. Compared in the column's
 * own type, like the CHECK, so that the expiry index answers it.
 */
async function countRowsFromBound(pool: DatabasePool, facts: TableFacts, boundText: string) {
  const expiry = sql.identifier([expiryColumnName(facts.shape)!]);
  const bound =
    keyReading(facts.shape).kind === 'naive'
      ? sql.fragment`${boundText}::timestamp`
      : sql.fragment`${boundText}::timestamptz`;
  return pool.oneFirst(sql.type(z.object({ count: z.number() }))`
    SELECT count(*)::float8 AS count FROM ${relationIdentifier(facts.shape.relation)}
    WHERE ${expiry} >= ${bound}
  `);
}

function planConversion(
  facts: TableFacts,
  settings: PartitionConfig,
  { longestMs, bound, starts }: ConversionDays,
  bounds: BoundWriter,
  rowsFromBound: number,
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

  // Rows at or after the bound cannot be in the legacy partition: the swap moves them into a
  // default partition. Until then they are in the table, so no CHECK can prove the bound, and
  // ATTACH checks the rows under the lock instead.
  const useCheck = facts.heapPages > SCAN_UNDER_LOCK_MAXIMUM_PAGES && rowsFromBound === 0;
  const defaultPartition = rowsFromBound > 0 ? { schema, name: names.defaultPartition } : null;
  if (defaultPartition) {
    if (facts.defaultNameTaken) {
      problems.push(
        `${rowsFromBound} rows of ${where} expire at or after the bound, and go to the default partition ${qualifiedName(defaultPartition)}, but that name is taken. Rename or drop it, then convert.`,
      );
    }
    warnings.push(
      `${rowsFromBound} rows of ${where} expire at or after the bound ${new Date(bound).toISOString()} ('infinity', or further ahead than a token lifetime of ${LONGEST_INFERRED_LIFETIME_DAYS} days): the swap moves them into the default partition ${qualifiedName(defaultPartition)}, where they stay.` +
        (facts.heapPages > SCAN_UNDER_LOCK_MAXIMUM_PAGES
          ? ` While they are in the table, no CHECK can prove the bound, so ATTACH PARTITION checks all ${facts.heapPages} pages of the table under the lock, holding the auth service's queries for that long (the swap gives up after ${SWAP_STATEMENT_TIMEOUT_MS} ms).`
          : ''),
    );
  }
  if (longestMs === 0 && settings.premakeDays === null) {
    const advice = `Set PARTITION_PREMAKE_DAYS to at least the longest lifetime of its rows, in days`;
    const none = `no row of ${where} expires within the next ${LONGEST_INFERRED_LIFETIME_DAYS} days`;
    if (useCheck) {
      // A big table whose rows have all expired tells nothing about how long new ones live.
      problems.push(
        `${none}, so the bound cannot be read from the table, and a new row could expire after it and fail to insert. ${advice}.`,
      );
    } else {
      warnings.push(
        `${none}, so partitions are made only ${PREMAKE_MARGIN_DAYS} days ahead, and a row that expires later than that would ${defaultPartition ? 'land in the default partition' : 'fail to insert'}. ${advice}.`,
      );
    }
  }
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
  const partitionStatements = starts.flatMap((lower) => {
    const partition = { schema, name: partitionName(shape.relation.name, lower, DAY_MS) };
    partitionsCreated.push(qualifiedName(partition));
    return [
      `CREATE TABLE ${quote(partition)} PARTITION OF ${table} FOR VALUES FROM (${bounds.literal(lower)}) TO (${bounds.literal(lower + DAY_MS)});`,
      ...(changeOwner ? [`ALTER TABLE ${quote(partition)} OWNER TO ${owner};`] : []),
    ];
  });
  const columns = facts.insertableColumns.map(escapeIdentifier).join(', ');
  const moveStatements = defaultPartition
    ? [
        `CREATE TABLE ${quote(defaultPartition)} PARTITION OF ${table} DEFAULT;`,
        ...(changeOwner ? [`ALTER TABLE ${quote(defaultPartition)} OWNER TO ${owner};`] : []),
        // Within the swap, so the auth service never misses them; the daily partitions exist
        // by now, so each row lands where a new insert of it would.
        `WITH moved AS (DELETE FROM ${legacy} WHERE ${expiry} >= ${boundLiteral}::${bounds.cast} RETURNING ${columns}) INSERT INTO ${table} (${columns}) SELECT ${columns} FROM moved;`,
      ]
    : [];
  if (defaultPartition) partitionsCreated.push(qualifiedName(defaultPartition));

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
    // A row trigger on the partitioned table is cloned onto every partition, so the legacy
    // partition's own copy goes; and it goes first, so that none fires for a row that only
    // moves to the default partition.
    ...facts.triggers.map(
      (trigger) => `DROP TRIGGER ${escapeIdentifier(trigger.name)} ON ${legacy};`,
    ),
    ...partitionStatements,
    ...moveStatements,
    `ALTER TABLE ${table} ATTACH PARTITION ${legacy} FOR VALUES FROM (MINVALUE) TO (${boundLiteral});`,
    // The partition's own bound says the same from now on.
    `ALTER TABLE ${legacy} DROP CONSTRAINT IF EXISTS ${escapeIdentifier(names.check)};`,
    ...parentIndexes,
    // The definition names the table the parent now is.
    ...facts.triggers.flatMap((trigger) => [
      `${trigger.definition};`,
      ...triggerState(table, trigger),
    ]),
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
    } else if (plan.facts.heapPages > SCAN_UNDER_LOCK_MAXIMUM_PAGES) {
      lines.push(
        '',
        '-- 2. Rows expire at or after the bound, so no CHECK can prove it: ATTACH PARTITION checks the rows under the lock.',
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
