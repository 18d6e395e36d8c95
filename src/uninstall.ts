// `uninstall` removes every object `install` made, whatever PURGE_SOURCE says now: the revoke
// triggers (a partitioned table's go with its own) and their function, the replication slot and
// the publication, the indexes install built on the targets, and the token_reaper schema with
// its version table and revocation times. One plan serves both uses, like install's:
// `uninstall --print` writes it out, `uninstall` runs it.
//
// Every step reads the catalog first and does nothing when its object is gone, so a second run
// changes nothing and an uninstall that stopped half-way finishes on the next run. It runs the
// way install does (withInstallSession): under the install lock, so that it never races an
// install; its table DDL in short lock_timeout attempts, and the concurrent index drops in one
// wait under INSTALL_LOCK_TIMEOUT, so the auth service's writes never queue behind it for long.
//
// The order undoes install's: the triggers first, so nothing notifies into a half-removed
// setup; the slot before its publication (a walsender reading the slot needs it); the schema
// last, with nothing left in it that a table depends on.
import { escapeIdentifier } from 'pg';
import type pg from 'pg';
import type { Config } from './config.js';
import { createDatabasePool, createPlainClient } from './db.js';
import {
  applySourceStep,
  dropAllRevokeTriggers,
  formatSourceStep,
  inShortLockTransactions,
  sourceStepLabel,
  targetIndexes,
  transaction,
  waitInOneGo,
  withInstallSession,
  type InstallSettings,
  type Patience,
  type SourceStep,
} from './install.js';
import type { Logger } from './logger.js';
import { inspectTargets, qualifiedName, type Relation, type TableShape } from './schema.js';

export type UninstallStep =
  | SourceStep
  | {
      readonly kind: 'dropIndex';
      readonly table: Relation;
      readonly index: Relation;
      /**
       * On a partitioned table: PostgreSQL cannot drop its index CONCURRENTLY, and dropping it
       * drops its partitions' indexes with it.
       */
      readonly partitioned: boolean;
    }
  | { readonly kind: 'dropSchema' };

export interface UninstallPlan {
  readonly steps: readonly UninstallStep[];
  /** Targets uninstall could not read (a table gone, a column changed): their indexes stay. */
  readonly skipped: readonly string[];
}

export interface UninstallResult {
  dropped: string[];
  absent: string[];
}

const SCHEMA = 'token_reaper';

export function buildUninstallPlan(
  config: Pick<Config, 'purge'>,
  shapes: readonly TableShape[],
  skipped: readonly string[] = [],
): UninstallPlan {
  const prompt = shapes
    .filter((shape) => shape.notify && shape.marker !== null)
    .map((shape) => shape.relation);
  const slot = config.purge.walSlot;
  return {
    steps: [
      // No version rows to forget: the schema that holds them goes last.
      dropAllRevokeTriggers(prompt, [], []),
      { kind: 'dropSlot', name: slot },
      { kind: 'dropPublication', name: slot },
      ...shapes.flatMap(indexSteps),
      { kind: 'dropSchema' },
    ],
    skipped,
  };
}

/**
 * The indexes install built on a target: the parent's first on a partitioned table (its
 * partitions' attached indexes go with it), then the partitions' by name, for any a failed
 * install left unattached.
 */
function indexSteps(shape: TableShape): UninstallStep[] {
  const tables = shape.partitioned ? [shape.relation, ...shape.leaves] : [shape.relation];
  return tables.flatMap((table) => {
    const indexes = targetIndexes(shape, table);
    return [indexes.expiry, indexes.marker].flatMap((index) =>
      index === null
        ? []
        : [
            {
              kind: 'dropIndex' as const,
              table,
              index: { schema: table.schema, name: index.name },
              partitioned: shape.partitioned && table === shape.relation,
            },
          ],
    );
  });
}

function stepLabel(step: UninstallStep): string {
  switch (step.kind) {
    case 'dropIndex':
      return `drop index ${qualifiedName(step.index)}`;
    case 'dropSchema':
      return `drop schema ${SCHEMA}`;
    default:
      return sourceStepLabel(step);
  }
}

function quoted(relation: Relation) {
  return `${escapeIdentifier(relation.schema)}.${escapeIdentifier(relation.name)}`;
}

function formatStep(step: UninstallStep): string {
  switch (step.kind) {
    case 'dropIndex':
      return step.partitioned
        ? `-- ${stepLabel(step)} (in a transaction: a partitioned table's index cannot be dropped CONCURRENTLY; its partitions' go with it)\n${transaction([`DROP INDEX IF EXISTS ${quoted(step.index)};`])}`
        : `-- ${stepLabel(step)} (outside a transaction, as DROP INDEX CONCURRENTLY must be)\nDROP INDEX CONCURRENTLY IF EXISTS ${quoted(step.index)};`;
    case 'dropSchema':
      return `-- ${stepLabel(step)}, with its version table and revocation times\n${transaction([`DROP SCHEMA IF EXISTS ${SCHEMA} CASCADE;`])}`;
    default:
      return formatSourceStep(step);
  }
}

/** The plan as one SQL script; running it changes what `uninstall` would. */
export function formatUninstallPlan(plan: UninstallPlan): string {
  const parts = [
    '-- token-reaper uninstall plan: the SQL `token-reaper uninstall` runs, in order. Each step is skipped when its object is gone.',
    ...plan.skipped.map((problem) => `-- skipped, so its indexes stay: ${problem}`),
    ...plan.steps.map(formatStep),
  ];
  return `${parts.join('\n\n')}\n`;
}

export async function applyUninstallPlan(
  client: pg.Client,
  plan: UninstallPlan,
  logger: Logger,
  settings: InstallSettings,
): Promise<UninstallResult> {
  const log = logger.child('uninstall');
  for (const problem of plan.skipped) {
    log.warn('uninstall.target_skipped', `${problem}; its indexes, if any, stay`, {});
  }
  return withInstallSession(client, log, settings, async (patience) => {
    const result: UninstallResult = { dropped: [], absent: [] };
    for (const step of plan.steps) {
      const label = stepLabel(step);
      patience.watch.file = label;
      const started = performance.now();
      if (!(await applyStep(client, step, patience))) {
        result.absent.push(label);
        continue;
      }
      result.dropped.push(label);
      log.info('uninstall.dropped', `${label}: done`, {
        step: label,
        durationMs: Math.round(performance.now() - started),
      });
    }
    return result;
  });
}

/** Drops the step's object; false when it was not there. */
async function applyStep(
  client: pg.Client,
  step: UninstallStep,
  patience: Patience,
): Promise<boolean> {
  const label = stepLabel(step);
  switch (step.kind) {
    case 'dropIndex': {
      if (!(await indexOn(client, step.table, step.index))) return false;
      if (step.partitioned) {
        await inShortLockTransactions(client, label, patience, () =>
          client.query(`DROP INDEX IF EXISTS ${quoted(step.index)}`),
        );
      } else {
        await waitInOneGo(
          client,
          label,
          `DROP INDEX CONCURRENTLY IF EXISTS ${quoted(step.index)}`,
          patience,
          'The index may be left invalid; the next uninstall drops it.',
        );
      }
      return true;
    }
    case 'dropSchema': {
      const found = await client.query<{ present: boolean }>(
        'SELECT to_regnamespace($1) IS NOT NULL AS present',
        [SCHEMA],
      );
      if (!found.rows[0]!.present) return false;
      await inShortLockTransactions(client, label, patience, () =>
        client.query(`DROP SCHEMA IF EXISTS ${SCHEMA} CASCADE`),
      );
      return true;
    }
    default:
      return applySourceStep(client, step, patience);
  }
}

/** Whether the index of that name is on that table: a name alone could be someone else's. */
async function indexOn(client: pg.Client, table: Relation, index: Relation) {
  const found = await client.query(
    `SELECT FROM pg_catalog.pg_index i
     JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = $1 AND c.relname = $2 AND i.indrelid = to_regclass($3)`,
    [index.schema, index.name, quoted(table)],
  );
  return found.rowCount !== 0;
}

/** The command: reads the targets, then prints the plan or runs it. */
export async function uninstall({
  config,
  logger,
  print,
}: {
  config: Config;
  logger: Logger;
  print: boolean;
}): Promise<number> {
  const pool = await createDatabasePool(config, logger, { maximumPoolSize: 1 });
  // A target that cannot be read (its table gone) has nothing of install's left on it; the
  // rest of the plan does not depend on the targets.
  const inspection = await inspectTargets(pool, config).finally(() => pool.end());
  const plan = buildUninstallPlan(config, inspection.shapes, inspection.problems);
  if (print) {
    process.stdout.write(formatUninstallPlan(plan));
    return 0;
  }
  const client = createPlainClient(config, logger);
  await client.connect();
  try {
    const result = await applyUninstallPlan(client, plan, logger, config);
    logger.info(
      'uninstall.finished',
      `uninstall finished: ${result.dropped.length} dropped, ${result.absent.length} not there`,
      { dropped: result.dropped, absent: result.absent },
    );
  } finally {
    await client.end();
  }
  return 0;
}
