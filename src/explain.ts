// `token-reaper explain`: what token-reaper will do to each target, before it does anything.
// It shows the rule as the SQL the sweep and the purge run (the same fragments, from
// predicates.ts, with their values written in), how each time column is read, whether the
// trigger and indexes are in place, and how many rows each part of the rule would delete now.
// Every problem of every target comes in the same run; any problem makes the exit code 2.
import { sql, type CommonQueryMethods, type FragmentSqlToken } from 'slonik';
import { z } from 'zod';
import type { Config, PurgeSourceName } from './config.js';
import { targetIndexes } from './install.js';
import {
  deadPredicate,
  expiredPredicate,
  markedPredicate,
  purgeablePredicate,
} from './predicates.js';
import {
  checkWalPrerequisites,
  publicationExists,
  readSlotState,
  withSlotClient,
  type SlotState,
} from './purge/sources/wal-slot.js';
import { inspectTargets, qualifiedName, relationIdentifier, type TableShape } from './schema.js';
import { describeReading } from './targets/time.js';
import { regclassOf } from './relation.js';

export interface TargetExplanation {
  target: string;
  table: string;
  layout: string;
  id: string | null;
  marker: string | null;
  expiry: string | null;
  keepExpiredFor: string | null;
  sweepDeletes: string;
  purgeDeletes: string | null;
  trigger: 'installed' | 'missing' | 'not used' | 'installed, not used';
  /**
   * present: built, valid, and on this table. Otherwise problem says what is wrong: missing,
   * left invalid by an interrupted build, or its name taken by another table's index.
   */
  indexes: { name: string; present: boolean; problem: string | null }[];
  counts: { rows: number; marked: number; expired: number; dead: number };
  sideEffects: string[];
  warnings: string[];
}

/** How revocations reach the prompt purge (PURGE_SOURCE), and for `wal` the slot's state. */
export interface SourceExplanation {
  name: PurgeSourceName;
  /** One line: the channel, the interval, or the slot and how much WAL it keeps. */
  summary: string;
  slot: (SlotState & { name: string; publication: boolean }) | null;
}

export interface Explanation {
  source: SourceExplanation;
  targets: TargetExplanation[];
  notes: string[];
  problems: string[];
}

const indexRow = z.object({
  name: z.string(),
  valid: z.boolean().nullable(),
  /** What holds the name when it is not an index of this table. */
  holder: z.string().nullable(),
});

const countsRow = z.object({
  rows: z.number(),
  marked: z.number(),
  expired: z.number(),
  dead: z.number(),
});

export async function explainTargets(
  connection: CommonQueryMethods,
  config: Pick<
    Config,
    | 'targets'
    | 'naiveTimestampsTimezone'
    | 'purge'
    | 'notifyChannel'
    | 'databaseUrl'
    | 'listenDatabaseUrl'
  >,
): Promise<Explanation> {
  const inspection = await inspectTargets(connection, config);
  const targets: TargetExplanation[] = [];
  for (const shape of inspection.shapes) {
    targets.push(await explainShape(connection, shape, config.purge.source));
  }
  const problems = [...inspection.problems];
  const source = await explainSource(config, problems);
  return { source, targets, notes: [...inspection.notes], problems };
}

/** The source's line; for `wal`, what the server lacks goes into `problems`, as the daemon would refuse it. */
async function explainSource(
  config: Pick<Config, 'purge' | 'notifyChannel' | 'databaseUrl' | 'listenDatabaseUrl'>,
  problems: string[],
): Promise<SourceExplanation> {
  const { source, walSlot, pollIntervalMs } = config.purge;
  if (source === 'notify') {
    return {
      name: source,
      summary: `the revoke trigger, LISTEN ${config.notifyChannel}`,
      slot: null,
    };
  }
  if (source === 'poll') {
    return { name: source, summary: `the catch-up query every ${pollIntervalMs} ms`, slot: null };
  }
  return withSlotClient(config, async (client) => {
    problems.push(...(await checkWalPrerequisites(client)));
    const slot = {
      name: walSlot,
      publication: await publicationExists(client, walSlot),
      ...(await readSlotState(client, walSlot)),
    };
    if (!slot.publication) {
      problems.push(
        `the publication ${walSlot} is missing: run token-reaper install with PURGE_SOURCE=wal`,
      );
    }
    const state = !slot.exists
      ? 'missing (the daemon makes it, then catches up; token-reaper install makes it now)'
      : slot.lost
        ? 'invalidated (the daemon makes it again, then catches up)'
        : `${slot.active ? 'streaming' : 'idle'}, keeping ${formatBytes(slot.retainedBytes ?? 0)} of WAL`;
    return { name: source, summary: `logical decoding from the slot ${walSlot}: ${state}`, slot };
  });
}

function formatBytes(bytes: number): string {
  const units = ['bytes', 'kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

async function explainShape(
  connection: CommonQueryMethods,
  shape: TableShape,
  source: PurgeSourceName,
): Promise<TargetExplanation> {
  const table = shape.relation;
  const marked = markedPredicate(shape, table);
  const expired = expiredPredicate(shape, table);
  const dead = deadPredicate(shape, table);
  const counts = await connection.one(sql.type(countsRow)`
    SELECT count(*)::float8 AS rows,
           count(*) FILTER (WHERE ${marked ?? sql.fragment`false`})::float8 AS marked,
           count(*) FILTER (WHERE ${expired ?? sql.fragment`false`})::float8 AS expired,
           count(*) FILTER (WHERE ${dead})::float8 AS dead
    FROM ${relationIdentifier(table)}
  `);
  const indexes = targetIndexes(shape);
  const indexNames = [indexes.expiry?.name, indexes.marker?.name].filter(
    (name): name is string => name !== undefined,
  );
  // A name is not enough: after a table is renamed and made again, its old index keeps the name.
  const found = new Map(
    (
      await connection.any(sql.type(indexRow)`
        SELECT c.relname AS name, i.indisvalid AS valid,
               CASE WHEN i.indrelid IS DISTINCT FROM ${regclassOf(table)}
                 THEN coalesce('the index of ' || i.indrelid::regclass::text, 'a relation that is no index')
               END AS holder
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
        WHERE n.nspname = ${table.schema} AND c.relname = ANY(${sql.array(indexNames, 'text')})
      `)
    ).map((row) => [row.name, row]),
  );
  const indexProblem = (name: string) => {
    const index = found.get(name);
    if (index === undefined) return 'missing';
    if (index.holder !== null) return `its name is taken by ${index.holder}`;
    return index.valid ? null : 'invalid, left by an interrupted build';
  };
  const marker = shape.marker;
  const expiry = shape.expiry;
  return {
    target: shape.rule.label,
    table: qualifiedName(table),
    layout: shape.partitionedByExpiry
      ? `partitioned by expiry, ${shape.leaves.length} partitions: expired ones are dropped whole`
      : shape.partitioned
        ? `partitioned, ${shape.leaves.length} partitions, swept one by one`
        : 'a plain table, swept in TID-range batches',
    id: shape.id ? `${shape.id.column} (${shape.id.type})` : null,
    marker:
      marker === null
        ? null
        : marker.kind === 'flag'
          ? `${marker.column} (boolean): dead when ${marker.dead}` +
            (marker.graceSeconds > 0
              ? `, after a grace of ${seconds(marker.graceSeconds)} counted from ${marker.graceFrom ? `${marker.graceFrom.column} (${describeReading(marker.graceFrom)})` : 'the time token-reaper first sees it marked'}`
              : '')
          : `${marker.time.column} (${describeReading(marker.time)}): dead once set and not in the future` +
            (marker.graceSeconds > 0 ? `, plus a grace of ${seconds(marker.graceSeconds)}` : ''),
    expiry:
      expiry === null
        ? null
        : expiry.kind === 'column'
          ? `${expiry.time.column} (${describeReading(expiry.time)})`
          : expiry.kind === 'lifetime'
            ? `${expiry.from.column} (${describeReading(expiry.from)}) + ${seconds(expiry.lifetimeSeconds)}`
            : `${expiry.from.column} (${describeReading(expiry.from)}) + ${expiry.secondsColumn} seconds`,
    keepExpiredFor: shape.keepExpiredForSeconds > 0 ? seconds(shape.keepExpiredForSeconds) : null,
    sweepDeletes: inline(dead),
    purgeDeletes: shape.notify ? inline(purgeablePredicate(shape, table)) : null,
    trigger:
      !shape.notify || source !== 'notify'
        ? shape.revokeTriggerInstalled
          ? 'installed, not used'
          : 'not used'
        : shape.revokeTriggerInstalled
          ? 'installed'
          : 'missing',
    indexes: indexNames.map((name) => ({
      name,
      present: indexProblem(name) === null,
      problem: indexProblem(name),
    })),
    counts,
    sideEffects: [...shape.sideEffects],
    warnings: [
      ...shape.warnings,
      ...(source === 'notify' && shape.notify && !shape.revokeTriggerInstalled
        ? [
            'the revoke trigger is not installed, so revoked rows wait for the sweep: run token-reaper install',
          ]
        : []),
      ...(source !== 'notify' && shape.revokeTriggerInstalled
        ? [
            `the revoke trigger is still installed, and PURGE_SOURCE=${source} does not use it: every revoking commit pays for its NOTIFY. Run token-reaper install to drop it`,
          ]
        : []),
      ...indexNames.flatMap((name) => {
        const problem = indexProblem(name);
        if (problem === null) return [];
        return [
          found.get(name)?.holder
            ? `the index ${name}: ${problem}. Rename or drop that one, then run token-reaper install`
            : `the index ${name} is ${problem}: run token-reaper install`,
        ];
      }),
    ],
  };
}

/** A fragment with its bound values written in, as a person reads it. */
function inline(fragment: FragmentSqlToken): string {
  return fragment.sql
    .replace(/\$slonik_(\d+)|\$(\d+)/g, (_match, slonik?: string, plain?: string) => {
      const value = fragment.values[Number(slonik ?? plain) - 1];
      return typeof value === 'string' ? `'${value.replace(/'/g, "''")}'` : String(value);
    })
    .replace(/\s+/g, ' ')
    .trim();
}

function seconds(total: number): string {
  const units: [number, string][] = [
    [86_400, 'day'],
    [3_600, 'hour'],
    [60, 'minute'],
    [1, 'second'],
  ];
  for (const [size, unit] of units) {
    if (total % size === 0 && total >= size) {
      const count = total / size;
      return `${count} ${unit}${count === 1 ? '' : 's'}`;
    }
  }
  return `${total} seconds`;
}

/** The explanation for a terminal. */
export function formatExplanation(explanation: Explanation): string {
  const lines: string[] = [
    `purge source: ${explanation.source.name}, ${explanation.source.summary}`,
    '',
  ];
  for (const target of explanation.targets) {
    lines.push(`${target.target}: ${target.table}`);
    const row = (label: string, value: string | null) => {
      if (value !== null) lines.push(`  ${label.padEnd(16)}${value}`);
    };
    row('layout', target.layout);
    row('id', target.id);
    row('marker', target.marker);
    row('expiry', target.expiry);
    row('kept expired', target.keepExpiredFor);
    row('sweep deletes', `WHERE ${target.sweepDeletes}`);
    row('purge deletes', target.purgeDeletes === null ? null : `WHERE ${target.purgeDeletes}`);
    row('revoke trigger', target.trigger);
    for (const index of target.indexes) {
      row('index', `${index.name}: ${index.problem ?? 'in place'}`);
    }
    row(
      'now',
      `${target.counts.dead} of ${target.counts.rows} rows dead (${target.counts.marked} marked, ${target.counts.expired} expired)`,
    );
    for (const effect of target.sideEffects) row('side effect', effect);
    for (const warning of target.warnings) row('warning', warning);
    lines.push('');
  }
  for (const note of explanation.notes) lines.push(`note: ${note}`);
  for (const problem of explanation.problems) lines.push(`problem: ${problem}`);
  return `${lines.join('\n').trimEnd()}\n`;
}
