// `install` applies the numbered files under sql/, rendered for this database's tables and
// columns. One plan serves both uses: `install --print` writes it out, `install` runs it.
//
// Each file runs in its own transaction, with its version row recorded in the same
// transaction, except the index builds: CREATE INDEX CONCURRENTLY cannot run inside a
// transaction, so those run alone and are recorded right after. Installers that race are
// serialized by a session advisory lock taken before anything else, so neither transaction
// boundaries nor IF NOT EXISTS have to carry the race.
//
// A concurrent index build that fails (a killed session, a deadlock) leaves an INVALID
// index behind, which IF NOT EXISTS would then skip forever. Before each build the plan's
// index is checked, and an invalid leftover is dropped concurrently and built again.
//
// Install runs next to a live auth service, so it never waits silently or without end. A
// second connection reads pg_blocking_pids while the plan runs and logs who is in the way
// (install.waiting). A DDL that would hold the auth service's writes in the lock queue waits
// there for a second at most, then rolls back and tries again later (install.lock_timeout),
// like the sweep's partition DDL. A concurrent build blocks no writer and waits in one go.
// Either gives up after INSTALL_LOCK_TIMEOUT, naming the blockers.
//
// PURGE_SOURCE decides the rest: the files marked `source=notify` (the trigger and its
// function) are in the plan under notify only, and after the files come the source's steps
// (SourceStep): the publication and the slot under wal, and the drops of what another source
// left. Those are checked against the catalog on every run rather than recorded.
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import type pg from 'pg';
import { sql, type CommonQueryMethods } from 'slonik';
import { z } from 'zod';
import { escapeIdentifier, escapeLiteral } from 'pg';
import { PURGE_SOURCES, type Config, type PurgeConfig, type PurgeSourceName } from './config.js';
import { APPLICATION_NAME, createSessionClient } from './db.js';
import { ConfigurationError, NewerSchemaVersionError } from './errors.js';
import {
  checkReplicaIdentities,
  checkWalPrerequisites,
  createSlotSql,
  dropPublicationSql,
  dropSlotSql,
  OUTPUT_PLUGIN,
  publicationSql,
  readSlotState,
} from './purge/sources/wal-slot.js';
import { retryOnLockTimeout } from './retry.js';
import { serializeError, type Logger } from './logger.js';
import {
  expiryTimeColumn,
  markerColumn,
  qualifiedName,
  REVOKE_TRIGGER_NAME,
  type Relation,
  type TableShape,
} from './schema.js';
import { SWEEP_LOCK } from './sweep/sweeper.js';

export const SQL_DIRECTORY = fileURLToPath(new URL('../sql/', import.meta.url));

/** Object 2 in token-reaper's advisory lock class: install. */
export const INSTALL_LOCK = { classId: SWEEP_LOCK.classId, objectId: 2 } as const;

export interface InstallStep {
  version: number;
  file: string;
  transactional: boolean;
  /**
   * The file rendered for this database: one statement, or for an index on a partitioned
   * table, the statements that build it online (see partitionedIndexStatements).
   */
  statements: InstallStatement[];
  checksum: string;
  /** The tables this step puts the revoke trigger on (schema-qualified, quoted). */
  triggerTables: string[];
  /** Records the step in token_reaper.schema_version. */
  recordSql: string;
}

/** An index the plan makes: its schema and name, and the table it belongs on. */
export interface PlannedIndex {
  schema: string;
  name: string;
  table: { schema: string; name: string };
}

export interface InstallStatement {
  sql: string;
  /** The index it builds concurrently, checked for an invalid leftover first. */
  index: PlannedIndex | null;
  /**
   * The partitioned index it creates ON ONLY the parent, valid once every partition's index is
   * attached: one of the indexes the step's version row vouches for (recordedIndexGuard).
   */
  partitionedIndex?: PlannedIndex;
}

/**
 * Which targets a file is rendered for: `all` renders it once; the others once per target
 * that has the revoke trigger (`notify`) or an expiry (`expiry`).
 */
type FileScope = 'all' | 'notify' | 'expiry';

interface SqlFile {
  version: number;
  file: string;
  text: string;
  scope: FileScope;
  transactional: boolean;
  indexVariable: string | null;
  /**
   * The PURGE_SOURCEs the file belongs to (`source=notify`), or null for every source. A file
   * out of the source's scope is left out of the plan, and what it made is dropped
   * (sourceSteps), so that a switch of source leaves no trigger firing for nobody.
   */
  sources: readonly PurgeSourceName[] | null;
}

const DIRECTIVE = /^-- token-reaper: (.*)$/m;

export async function readSqlFiles(directory = SQL_DIRECTORY): Promise<SqlFile[]> {
  const names = (await readdir(directory)).filter((name) => /^\d{3}-.*\.sql$/.test(name)).sort();
  return Promise.all(
    names.map(async (file) => {
      const text = await readFile(new URL(file, `file://${directory}`), 'utf8');
      const settings = new Map(
        (DIRECTIVE.exec(text)?.[1] ?? '').split(/\s+/).map((pair) => {
          const [key, value] = pair.split('=');
          return [key, value] as const;
        }),
      );
      const scope = settings.get('target');
      if (scope !== 'all' && scope !== 'notify' && scope !== 'expiry') {
        throw new Error(
          `sql/${file} has no valid "-- token-reaper: target=all|notify|expiry" directive`,
        );
      }
      const sources = settings.get('source')?.split(',') ?? null;
      if (sources?.some((source) => !(PURGE_SOURCES as readonly string[]).includes(source))) {
        throw new Error(`sql/${file} names a source that is not ${PURGE_SOURCES.join(', ')}`);
      }
      return {
        version: Number(file.slice(0, 3)),
        file,
        text,
        scope,
        transactional: settings.get('transaction') !== 'none',
        indexVariable: settings.get('index') ?? null,
        sources: sources as PurgeSourceName[] | null,
      };
    }),
  );
}

type TemplateValue = { identifier: string } | { literal: string } | { fragment: string };
export type TemplateVariables = Map<string, TemplateValue>;

function inScope(file: SqlFile, shape: TableShape) {
  return file.scope === 'notify' ? shape.notify && shape.marker !== null : shape.expiry !== null;
}

/**
 * The indexes install builds on a target (or on one of its partitions, `table`): on the expiry's
 * time column, and the partial index on marked rows for a target with the revoke trigger.
 */
export function targetIndexes(shape: TableShape, table: Relation = shape.relation) {
  const expiryColumn = shape.expiry ? expiryTimeColumn(shape.expiry).column : null;
  const marker = shape.notify && shape.marker ? markerColumn(shape.marker) : null;
  return {
    expiry:
      expiryColumn === null
        ? null
        : { column: expiryColumn, name: indexName(table.name, expiryColumn) },
    marker: marker === null ? null : { column: marker, name: indexName(table.name, marker) },
  };
}

/**
 * The psql-style variables the files use, :"identifier", :'literal' and :raw_fragment, for one
 * target (or for none, in a file rendered once).
 */
export function templateVariables(
  config: Pick<Config, 'notifyChannel'>,
  shape: TableShape | null,
  table: Relation | null = shape?.relation ?? null,
): TemplateVariables {
  const variables: TemplateVariables = new Map();
  variables.set('notify_channel', { literal: config.notifyChannel });
  if (shape === null || table === null) return variables;
  variables.set('schema', { identifier: table.schema });
  variables.set('table', { identifier: table.name });
  variables.set('qualified_name', { literal: qualifiedName(shape.relation) });
  if (shape.id) variables.set('id_column', { identifier: shape.id.column });
  const indexes = targetIndexes(shape, table);
  if (indexes.expiry) {
    variables.set('expiry_column', { identifier: indexes.expiry.column });
    variables.set('expiry_index', { identifier: indexes.expiry.name });
  }
  if (indexes.marker) variables.set('marker_index', { identifier: indexes.marker.name });
  const marker = shape.marker;
  if (marker) {
    const name = markerColumn(marker);
    const column = escapeIdentifier(name);
    variables.set('marker_column', { identifier: name });
    // The marked rows, in the form the catch-up repeats (predicates.ts, markerIndexPredicate).
    variables.set('marker_index_predicate', {
      fragment:
        marker.kind === 'time' ? `${column} IS NOT NULL` : marker.dead ? column : `NOT ${column}`,
    });
    // Marked now and not before, or the other way round: an un-revoke must reach the daemon
    // too, so that a recorded grace starts again at the next revocation (revocations.ts).
    // IS TRUE / IS FALSE / IS NOT NULL are never NULL, so a NULL marker counts as not marked.
    const marked = marker.kind === 'time' ? 'IS NOT NULL' : marker.dead ? 'IS TRUE' : 'IS FALSE';
    variables.set('marker_changed', {
      fragment: `(NEW.${column} ${marked}) <> (OLD.${column} ${marked})`,
    });
  }
  return variables;
}

// `:name`, `:"name"` or `:'name'`, but not the second colon of a `::type` cast.
const VARIABLE = /(?<![:\w]):(?:"(\w+)"|'(\w+)'|(\w+))/g;

export function renderSql(text: string, variables: TemplateVariables, file: string): string {
  return text.replace(VARIABLE, (match, quoted?: string, literal?: string, raw?: string) => {
    const name = (quoted ?? literal ?? raw)!;
    const value = variables.get(name);
    if (value === undefined) throw new Error(`sql/${file} uses unknown variable ${match}`);
    if (quoted !== undefined && 'identifier' in value) return escapeIdentifier(value.identifier);
    if (literal !== undefined && 'literal' in value) return escapeLiteral(value.literal);
    if (literal !== undefined && 'identifier' in value) return escapeLiteral(value.identifier);
    if (raw !== undefined && 'fragment' in value) return value.fragment;
    throw new Error(`sql/${file} uses ${match} in a form its value does not have`);
  });
}

/**
 * Partitions that already have an index attached to a partitioned index, by the parent index
 * (`schema.name`): a partition made after the parent's index exists gets its own from
 * PostgreSQL, and building a second one would leave it unattachable.
 */
export type AttachedIndexes = ReadonlyMap<string, ReadonlySet<string>>;

const attachedIndexRow = z.object({ parentIndex: z.string(), partition: z.string() });

export async function readAttachedIndexes(
  connection: CommonQueryMethods,
): Promise<AttachedIndexes> {
  const rows = await connection.any(sql.type(attachedIndexRow)`
    SELECT parent_namespace.nspname || '.' || parent_index.relname AS "parentIndex",
           partition_namespace.nspname || '.' || partition.relname AS partition
    FROM pg_catalog.pg_inherits inheritance
    JOIN pg_catalog.pg_class parent_index
      ON parent_index.oid = inheritance.inhparent AND parent_index.relkind = 'I'
    JOIN pg_catalog.pg_namespace parent_namespace ON parent_namespace.oid = parent_index.relnamespace
    JOIN pg_catalog.pg_index child_index ON child_index.indexrelid = inheritance.inhrelid
    JOIN pg_catalog.pg_class partition ON partition.oid = child_index.indrelid
    JOIN pg_catalog.pg_namespace partition_namespace ON partition_namespace.oid = partition.relnamespace
  `);
  const attached = new Map<string, Set<string>>();
  for (const row of rows) {
    if (!attached.has(row.parentIndex)) attached.set(row.parentIndex, new Set());
    attached.get(row.parentIndex)!.add(row.partition);
  }
  return attached;
}

/**
 * The revoke triggers the catalog has: the parent's own, not its partitions' clones (they go
 * with it), on whatever table, configured or not; a table left out of a targets file keeps
 * its trigger until install drops it. The one reading of them, for the plan and for apply.
 */
export async function readRevokeTriggers(client: pg.ClientBase): Promise<RevokeTrigger[]> {
  const result = await client.query<RevokeTrigger>(
    `SELECT n.nspname AS schema, c.relname AS name, t.tgname AS trigger
     FROM pg_catalog.pg_trigger t
     JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     -- token_reaper.notify_revoked() by the catalog alone: to_regprocedure would need USAGE
     -- on the schema, which a role that install is about to refuse may not have.
     JOIN pg_catalog.pg_proc f ON f.oid = t.tgfoid
     JOIN pg_catalog.pg_namespace fn ON fn.oid = f.pronamespace
     WHERE fn.nspname = $1 AND f.proname = $2 AND f.pronargs = 0
       AND t.tgparentid = 0 AND NOT t.tgisinternal
     ORDER BY 1, 2`,
    [REVOKE_FUNCTION_NAME.schema, REVOKE_FUNCTION_NAME.name],
  );
  return result.rows;
}

/** A trigger that calls token_reaper.notify_revoked(), and its table. */
export interface RevokeTrigger extends Relation {
  /** Install names it REVOKE_TRIGGER_NAME; the catalog may hold it under another name. */
  readonly trigger: string;
}

/** What the plan needs to know of the database as it is, besides the targets' shapes. */
export interface InstallCatalog {
  readonly attachedIndexes?: AttachedIndexes;
  /** The revoke triggers there are now (readRevokeTriggers). */
  readonly revokeTriggers?: readonly RevokeTrigger[];
}

/** What install does, in order: the files of sql/, then the purge source's objects. */
export interface InstallPlan {
  steps: InstallStep[];
  source: SourceStep[];
}

export async function buildInstallPlan(
  config: Pick<Config, 'notifyChannel' | 'purge'>,
  shapes: readonly TableShape[],
  { attachedIndexes = new Map(), revokeTriggers = [] }: InstallCatalog = {},
  directory = SQL_DIRECTORY,
): Promise<InstallPlan> {
  const allFiles = await readSqlFiles(directory);
  const forSource = (file: SqlFile) =>
    file.sources === null || file.sources.includes(config.purge.source);
  const files = allFiles.filter(
    (file) =>
      forSource(file) && (file.scope === 'all' || shapes.some((shape) => inScope(file, shape))),
  );
  const otherSourcesVersions = allFiles
    .filter((file) => !forSource(file))
    .map((file) => file.version);
  return {
    steps: files.map((file) => installStep(file, config, shapes, attachedIndexes)),
    source: sourceSteps(config.purge, shapes, otherSourcesVersions, revokeTriggers),
  };
}

function installStep(
  file: SqlFile,
  config: Pick<Config, 'notifyChannel'>,
  shapes: readonly TableShape[],
  attachedIndexes: AttachedIndexes,
): InstallStep {
  const statements = renderStatements(file, config, shapes, attachedIndexes);
  // The checksum is of the file rendered for these tables, not of what the database already
  // has: indexes a partition got from its parent make statements drop out, not the file change.
  const rendered = renderStatements(file, config, shapes, new Map());
  const checksum = createHash('sha256')
    .update(rendered.map((statement) => statement.sql).join('\n'))
    .digest('hex')
    .slice(0, 16);
  return {
    version: file.version,
    file: file.file,
    transactional: file.transactional,
    statements,
    checksum,
    triggerTables: file.text.includes(`TRIGGER ${REVOKE_TRIGGER_NAME}`)
      ? shapes.filter((shape) => inScope(file, shape)).map((shape) => quotedName(shape.relation))
      : [],
    recordSql:
      `INSERT INTO token_reaper.schema_version (version, name, checksum) ` +
      `VALUES (${file.version}, ${escapeLiteral(file.file)}, ${escapeLiteral(checksum)}) ` +
      `ON CONFLICT (version) DO UPDATE SET name = EXCLUDED.name, ` +
      `checksum = EXCLUDED.checksum, applied_at = now();`,
  };
}

function renderStatements(
  file: SqlFile,
  config: Pick<Config, 'notifyChannel'>,
  shapes: readonly TableShape[],
  attachedIndexes: AttachedIndexes,
): InstallStatement[] {
  if (file.scope === 'all') {
    return [
      { sql: renderSql(file.text, templateVariables(config, null), file.file).trim(), index: null },
    ];
  }
  return shapes
    .filter((shape) => inScope(file, shape))
    .flatMap((shape) => {
      const variables = templateVariables(config, shape);
      const sql = renderSql(file.text, variables, file.file).trim();
      if (file.indexVariable === null) return [{ sql, index: null }];
      const name = (variables.get(file.indexVariable) as { identifier: string }).identifier;
      if (!shape.partitioned) {
        return [{ sql, index: { schema: shape.relation.schema, name, table: shape.relation } }];
      }
      const attached = attachedIndexes.get(`${shape.relation.schema}.${name}`) ?? new Set<string>();
      return partitionedIndexStatements(file, config, shape, name, sql, attached);
    });
}

/**
 * PostgreSQL cannot build an index CONCURRENTLY on a partitioned table. The online way is to
 * create the parent's index ON ONLY the parent (instant, and invalid until complete), build
 * each partition's index concurrently, and attach each one; the parent's index turns valid
 * once every partition's is attached, and partitions created later get theirs automatically.
 * Each partition's statement is the same file rendered with the partition in the table's
 * place, so the index definition is written once.
 */
function partitionedIndexStatements(
  file: SqlFile,
  config: Pick<Config, 'notifyChannel'>,
  shape: TableShape,
  parentIndex: string,
  parentSql: string,
  attached: ReadonlySet<string>,
): InstallStatement[] {
  const parentTable = `${escapeIdentifier(shape.relation.schema)}.${escapeIdentifier(shape.relation.name)}`;
  const onlyParent = parentSql
    .replace('CREATE INDEX CONCURRENTLY', 'CREATE INDEX')
    .replace(`ON ${parentTable}`, `ON ONLY ${parentTable}`);
  const statements: InstallStatement[] = [
    {
      sql: onlyParent,
      index: null,
      partitionedIndex: { schema: shape.relation.schema, name: parentIndex, table: shape.relation },
    },
  ];
  // Partitions made after the parent's index existed already have theirs.
  for (const leaf of shape.leaves.filter((leaf) => !attached.has(qualifiedName(leaf)))) {
    const leafVariables = templateVariables(config, shape, leaf);
    const leafIndex = (leafVariables.get(file.indexVariable!) as { identifier: string }).identifier;
    statements.push({
      sql: renderSql(file.text, leafVariables, file.file).trim(),
      index: { schema: leaf.schema, name: leafIndex, table: leaf },
    });
    statements.push({
      sql: `ALTER INDEX ${escapeIdentifier(shape.relation.schema)}.${escapeIdentifier(parentIndex)} ATTACH PARTITION ${escapeIdentifier(leaf.schema)}.${escapeIdentifier(leafIndex)};`,
      index: null,
    });
  }
  return statements;
}

/** The plan as one SQL script, for a DBA to review or to put into their own migrations. */
export function formatInstallPlan(plan: InstallPlan): string {
  const parts = ['-- token-reaper install plan: the SQL `token-reaper install` runs, in order.'];
  for (const step of plan.steps) {
    parts.push(
      step.transactional
        ? `-- ${step.file}\nBEGIN;\n${sqlOf(step)}\n${step.recordSql}\nCOMMIT;`
        : `-- ${step.file} (outside a transaction: CREATE INDEX CONCURRENTLY cannot run in one)\n${sqlOf(step)}\n${transaction(recordAfterIndexes(step))}`,
    );
  }
  parts.push(...plan.source.map(formatSourceStep));
  return `${parts.join('\n\n')}\n`;
}

/**
 * The version row of a step that runs outside a transaction, as a script records it: a script
 * run by psql without ON_ERROR_STOP, or by a migration tool, may go on after a failed build, so
 * the row is written only once every index the step makes exists and is valid. The check fails
 * the transaction otherwise, and the row goes with it.
 */
export function recordAfterIndexes(step: InstallStep): string[] {
  const indexes = plannedIndexes(step);
  if (indexes.length === 0) return [step.recordSql];
  const array = (names: string[]) => `ARRAY[${names.map(escapeLiteral).join(', ')}]`;
  return [
    [
      'DO $token_reaper$',
      'BEGIN',
      '  IF EXISTS (',
      `    SELECT FROM unnest(${array(indexes.map(quotedName))}, ${array(indexes.map((index) => quotedName(index.table)))}) planned (name, on_table)`,
      '    LEFT JOIN pg_catalog.pg_index i',
      '      ON i.indexrelid = to_regclass(planned.name) AND i.indrelid = to_regclass(planned.on_table)',
      '    WHERE i.indisvalid IS NOT TRUE',
      '  ) THEN',
      `    RAISE EXCEPTION '%', ${escapeLiteral(`token-reaper: an index that ${step.file} builds is missing or invalid, so it is not recorded; run token-reaper install to build it`)};`,
      '  END IF;',
      'END',
      '$token_reaper$;',
    ].join('\n'),
    step.recordSql,
  ];
}

export interface InstallResult {
  applied: string[];
  unchanged: string[];
}

/** What apply needs beyond the plan: where to open the watching connection, and its patience. */
export type InstallSettings = Parameters<typeof createSessionClient>[0] &
  Pick<Config, 'installLockTimeoutSeconds'>;

export async function applyInstallPlan(
  client: pg.Client,
  plan: InstallPlan,
  logger: Logger,
  settings: InstallSettings,
): Promise<InstallResult> {
  const log = logger.child('install');
  return withInstallSession(client, log, settings, async (patience) => {
    const recorded = await recordedVersions(client);
    const newest = Math.max(0, ...recorded.keys());
    const known = Math.max(0, ...plan.steps.map((step) => step.version));
    if (newest > known) {
      throw new NewerSchemaVersionError([
        `the database's token_reaper schema is at version ${newest}, newer than this token-reaper knows (${known}). Upgrade token-reaper.`,
      ]);
    }
    const result: InstallResult = { applied: [], unchanged: [] };
    for (const step of plan.steps) {
      if (recorded.get(step.version) === step.checksum && !(await objectsMissing(client, step))) {
        result.unchanged.push(step.file);
        continue;
      }
      patience.watch.file = step.file;
      const started = performance.now();
      await applyStep(client, step, patience);
      result.applied.push(step.file);
      log.info('install.applied', `applied ${step.file}`, {
        file: step.file,
        version: step.version,
        durationMs: Math.round(performance.now() - started),
      });
    }
    // After the files, so that a switch adds the new source's objects before it drops the old
    // one's: no revocation goes unseen in between.
    for (const step of plan.source) {
      const label = sourceStepLabel(step);
      patience.watch.file = label;
      const started = performance.now();
      if (!(await applySourceStep(client, step, patience))) {
        result.unchanged.push(label);
        continue;
      }
      result.applied.push(label);
      log.info('install.applied', `applied ${label}`, {
        file: label,
        durationMs: Math.round(performance.now() - started),
      });
    }
    return result;
  });
}

async function applyStep(client: pg.Client, step: InstallStep, patience: Patience) {
  if (step.transactional) {
    await inShortLockTransactions(client, step.file, patience, async () => {
      await client.query(sqlOf(step));
      await client.query(step.recordSql);
    });
    return;
  }
  await refuseTakenIndexNames(client, step);
  for (const statement of step.statements) {
    if (statement.index) {
      await buildConcurrently(client, step.file, statement.sql, statement.index, patience);
    } else {
      await inShortLockTransactions(client, step.file, patience, () => client.query(statement.sql));
    }
  }
  await client.query(step.recordSql);
}

/**
 * Runs `work` the way install changes the database, also for uninstall: under install's
 * advisory lock, watched for blockers, with INSTALL_LOCK_TIMEOUT as the session's lock_timeout.
 * That lock_timeout bounds every wait outside the short DDL transactions: the concurrent index
 * builds and drops, and a slot's creation, which waits for the transactions in progress.
 */
export async function withInstallSession<T>(
  client: pg.Client,
  log: Logger,
  settings: InstallSettings,
  work: (patience: Patience) => Promise<T>,
): Promise<T> {
  await acquireInstallLock(client, log);
  const watch = await watchBlockers(client, settings, log);
  const patience = { watch, log, budgetMs: settings.installLockTimeoutSeconds * 1000 };
  try {
    await client.query(`SELECT set_config('lock_timeout', $1, false)`, [`${patience.budgetMs}ms`]);
    return await work(patience);
  } finally {
    await watch.stop();
    await client.query('RESET lock_timeout');
    await client.query('SELECT pg_advisory_unlock($1, $2)', [
      INSTALL_LOCK.classId,
      INSTALL_LOCK.objectId,
    ]);
  }
}

// ---------------------------------------------------------------------------------------------
// The purge source's objects (PURGE_SOURCE). They are not recorded in schema_version: each run
// reads the catalog and adds what the source needs and drops what another source left, so a
// switch either way, and back, is one `install`, and a second run finds nothing to do. The
// slot is no transactional object at all (it cannot be made in a transaction that wrote).
//
// notify: the revoke trigger (sql/002, 003); no publication, no slot.
// wal:    the publication, then the slot (pgoutput reads the publication with the catalog as it
//         was when each change was written, so it must be older than the slot); no trigger.
// poll:   none of them.
// The partial index on marked rows (sql/005) serves every source: the catch-up and poll use it.

/** One change to the purge source's objects; its SQL is idempotent, and --print shows it. */
export type SourceStep =
  | { readonly kind: 'publication'; readonly name: string; readonly tables: readonly Relation[] }
  | { readonly kind: 'slot'; readonly name: string }
  | {
      readonly kind: 'dropRevokeTriggers';
      /**
       * The triggers that go, as the plan saw them, for --print; apply drops every one the
       * catalog has then, but those kept.
       */
      readonly triggers: readonly RevokeTrigger[];
      /**
       * Under notify, its prompt targets: their trigger of install's name stays, and so does
       * the function. The step then drops only the triggers of tables no longer purged
       * promptly (left out of a targets file), which would go on notifying, and holding the
       * auth service's commits in line, for no one; none may be kept. null when revocations
       * reach the daemon another way, and at uninstall: every trigger goes, then the function.
       */
      readonly keep: readonly Relation[] | null;
      /** The version rows of the files that made the trigger and its function (keep: null). */
      readonly versions: readonly number[];
    }
  | { readonly kind: 'dropSlot'; readonly name: string }
  | { readonly kind: 'dropPublication'; readonly name: string };

/** The source's objects, added first, then the other sources' objects, dropped. */
function sourceSteps(
  purge: Pick<PurgeConfig, 'source' | 'walSlot'>,
  shapes: readonly TableShape[],
  otherSourcesVersions: readonly number[],
  revokeTriggers: readonly RevokeTrigger[],
): SourceStep[] {
  const prompt = shapes
    .filter((shape) => shape.notify && shape.marker !== null)
    .map((shape) => shape.relation);
  // With no target to purge promptly there is nothing to stream: a slot would only keep WAL.
  const streams = purge.source === 'wal' && prompt.length > 0;
  const name = purge.walSlot;
  const steps: SourceStep[] = [];
  if (streams) steps.push({ kind: 'publication', name, tables: prompt }, { kind: 'slot', name });
  if (purge.source !== 'notify') {
    steps.push(dropAllRevokeTriggers(prompt, revokeTriggers, otherSourcesVersions));
  } else {
    const unused = revokeTriggersBut(revokeTriggers, prompt);
    if (unused.length > 0) {
      steps.push({ kind: 'dropRevokeTriggers', triggers: unused, keep: prompt, versions: [] });
    }
  }
  // The slot first: a walsender streaming from it fails once its publication is gone.
  if (!streams) steps.push({ kind: 'dropSlot', name }, { kind: 'dropPublication', name });
  return steps;
}

/**
 * Every revoke trigger goes, then the function: those of the targets, as install names them
 * (for --print, whatever the catalog has at the time), and any other the catalog has.
 */
export function dropAllRevokeTriggers(
  targets: readonly Relation[],
  revokeTriggers: readonly RevokeTrigger[],
  versions: readonly number[],
): SourceStep {
  const named = targets.map((table) => ({ ...table, trigger: REVOKE_TRIGGER_NAME }));
  return {
    kind: 'dropRevokeTriggers',
    triggers: [...named, ...revokeTriggersBut(revokeTriggers, targets)],
    keep: null,
    versions,
  };
}

/** The revoke triggers but the one of install's name on each of the tables kept. */
function revokeTriggersBut(revokeTriggers: readonly RevokeTrigger[], kept: readonly Relation[]) {
  // Compared as [schema, name] pairs: a dot may be part of either.
  const key = ({ schema, name }: Relation) => JSON.stringify([schema, name]);
  const keptKeys = new Set(kept.map(key));
  return revokeTriggers.filter(
    (trigger) => !(keptKeys.has(key(trigger)) && trigger.trigger === REVOKE_TRIGGER_NAME),
  );
}

export function sourceStepLabel(step: SourceStep): string {
  switch (step.kind) {
    case 'publication':
      return `publication ${step.name}`;
    case 'slot':
      return `replication slot ${step.name}`;
    case 'dropRevokeTriggers':
      return step.keep === null
        ? 'drop revoke trigger'
        : `drop revoke trigger on ${[...new Set(step.triggers.map(qualifiedName))].join(', ')}`;
    case 'dropSlot':
      return `drop replication slot ${step.name}`;
    case 'dropPublication':
      return `drop publication ${step.name}`;
  }
}

const REVOKE_FUNCTION_NAME = { schema: 'token_reaper', name: 'notify_revoked' } as const;
const REVOKE_FUNCTION = `${REVOKE_FUNCTION_NAME.schema}.${REVOKE_FUNCTION_NAME.name}()`;

/** The step as --print shows it: the same statements apply runs when the catalog needs them. */
export function formatSourceStep(step: SourceStep): string {
  const title = `-- ${sourceStepLabel(step)}`;
  switch (step.kind) {
    case 'publication':
      return `${title} (before the slot: pgoutput reads it as it was when each change was written)\n${transaction(publicationSql(step.name, step.tables))}`;
    case 'slot':
      return `${title} (outside a transaction: a slot cannot be made in one that wrote; one the server gave up, wal_status = 'lost', is made again)\n${dropLostSlotSql(step.name)}\n${createSlotSql(step.name)}`;
    case 'dropRevokeTriggers':
      return [
        step.keep === null
          ? `${title}: revocations reach the daemon another way`
          : `${title}: no longer purged promptly`,
        ...step.triggers.map((table) => transaction([dropTriggerSql(table, table.trigger)])),
        ...(step.keep === null ? [transaction(dropRevokeFunctionSql(step.versions))] : []),
      ].join('\n');
    case 'dropSlot':
      return `${title} (a walsender streaming from it is ended first: SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = ${escapeLiteral(step.name)};)\n${dropSlotSql(step.name)}`;
    case 'dropPublication':
      return `${title}\n${transaction([dropPublicationSql(step.name)])}`;
  }
}

/** A piece of a printed migration: statements in one transaction, or one statement alone. */
export type ScriptUnit =
  | { readonly transaction: true; readonly comment: string; readonly statements: string[] }
  | { readonly transaction: false; readonly comment: string; readonly statement: string };

/** The source step as units of a migration (install-formats.ts): formatSourceStep's SQL. */
export function sourceStepUnits(step: SourceStep): ScriptUnit[] {
  const comment = sourceStepLabel(step);
  switch (step.kind) {
    case 'publication':
      return [{ transaction: true, comment, statements: publicationSql(step.name, step.tables) }];
    case 'slot':
      // A slot cannot be made in a transaction that wrote: each statement alone.
      return [
        { transaction: false, comment, statement: dropLostSlotSql(step.name) },
        { transaction: false, comment, statement: createSlotSql(step.name) },
      ];
    case 'dropRevokeTriggers':
      return [
        ...step.triggers.map((table) => ({
          transaction: true as const,
          comment,
          statements: [dropTriggerSql(table, table.trigger)],
        })),
        ...(step.keep === null
          ? [
              {
                transaction: true as const,
                comment,
                statements: dropRevokeFunctionSql(step.versions),
              },
            ]
          : []),
      ];
    case 'dropSlot':
      return [{ transaction: false, comment, statement: dropSlotSql(step.name) }];
    case 'dropPublication':
      return [{ transaction: true, comment, statements: [dropPublicationSql(step.name)] }];
  }
}

/** Makes the catalog match the step; false when it already did. */
export async function applySourceStep(
  client: pg.Client,
  step: SourceStep,
  patience: Patience,
): Promise<boolean> {
  const label = sourceStepLabel(step);
  switch (step.kind) {
    case 'publication': {
      if (await publicationMatches(client, step.name, step.tables)) return false;
      await inShortLockTransactions(client, label, patience, () =>
        client.query(publicationSql(step.name, step.tables).join('\n')),
      );
      return true;
    }
    case 'slot': {
      const slot = await readOwnSlot(client, step.name);
      if (slot.foreign !== null) throw new ConfigurationError([slot.foreign]);
      if (slot.state.exists && !slot.state.lost) return false;
      if (slot.state.lost) {
        patience.log.warn(
          'install.slot_lost',
          `the replication slot ${step.name} was given up by the server (max_slot_wal_keep_size); making it again`,
          { slot: step.name },
        );
        await dropOwnSlot(client, step.name, patience);
      }
      // It waits for the transactions in progress to end, which blocks no writer.
      await waitInOneGo(client, label, createSlotSql(step.name), patience, 'No slot was made.');
      return true;
    }
    case 'dropRevokeTriggers':
      return dropRevokeTriggers(client, step, patience);
    case 'dropSlot': {
      const slot = await readOwnSlot(client, step.name);
      // Another database's slot of the same name is not ours to drop.
      if (!slot.state.exists || slot.foreign !== null) return false;
      await dropOwnSlot(client, step.name, patience);
      return true;
    }
    case 'dropPublication': {
      const found = await client.query('SELECT FROM pg_catalog.pg_publication WHERE pubname = $1', [
        step.name,
      ]);
      if (found.rowCount === 0) return false;
      await inShortLockTransactions(client, label, patience, () =>
        client.query(dropPublicationSql(step.name)),
      );
      return true;
    }
  }
}

/**
 * PURGE_SOURCE=wal on this server, publishing these tables: a ConfigurationError (exit 2)
 * naming each fix, if it cannot.
 */
export async function requireWalPrerequisites(
  client: pg.Client,
  tables: readonly Relation[],
): Promise<void> {
  const problems = [
    ...(await checkWalPrerequisites(client)),
    ...(await checkReplicaIdentities(client, tables)),
  ];
  if (problems.length > 0) throw new ConfigurationError(problems);
}

/** Whether the publication exists exactly as publicationSql makes it. */
async function publicationMatches(
  client: pg.Client,
  name: string,
  tables: readonly Relation[],
): Promise<boolean> {
  const { rows } = await client.query<{ matches: boolean; tables: [string, string][] }>(
    `SELECT NOT p.puballtables AND p.pubinsert AND p.pubupdate AND NOT p.pubdelete
              AND NOT p.pubtruncate AND p.pubviaroot AS matches,
            (SELECT coalesce(json_agg(json_build_array(n.nspname, c.relname)), '[]')
             FROM pg_catalog.pg_publication_rel r
             JOIN pg_catalog.pg_class c ON c.oid = r.prrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE r.prpubid = p.oid) AS tables
     FROM pg_catalog.pg_publication p WHERE p.pubname = $1`,
    [name],
  );
  const found = rows[0];
  if (found === undefined || !found.matches) return false;
  const names = (pairs: (readonly [string, string])[]) =>
    JSON.stringify(pairs.map((pair) => JSON.stringify(pair)).sort());
  return names(found.tables) === names(tables.map((table) => [table.schema, table.name]));
}

/**
 * The slot's state, and why it is not token-reaper's when it is not: slots belong to the
 * cluster, and another database (or tool) may have one of the name.
 */
async function readOwnSlot(client: pg.Client, name: string) {
  const state = await readSlotState(client, name);
  const { rows } = await client.query<{ database: string | null; plugin: string | null }>(
    `SELECT database, plugin FROM pg_catalog.pg_replication_slots
     WHERE slot_name = $1 AND NOT (database = current_database() AND plugin = $2)`,
    [name, OUTPUT_PLUGIN],
  );
  const other = rows[0];
  const foreign =
    other === undefined
      ? null
      : `the replication slot ${name} exists, and is ${other.database === null ? 'a physical slot' : `a slot of database ${other.database}${other.plugin === OUTPUT_PLUGIN ? '' : ` with the plugin ${other.plugin}`}`}, not token-reaper's in this database. Set PURGE_WAL_SLOT to a name of its own for this database (slots are shared by the whole server).`;
  return { state, foreign };
}

const OBJECT_IN_USE = '55006';

/**
 * Drops token-reaper's slot. A walsender streaming from it (the daemon, still running under
 * wal) makes the server refuse (55006): it is token-reaper's own, so that walsender is ended
 * and the drop tried again, until INSTALL_LOCK_TIMEOUT is spent.
 */
async function dropOwnSlot(client: pg.Client, name: string, { log, budgetMs }: Patience) {
  const started = performance.now();
  for (;;) {
    try {
      await client.query(dropSlotSql(name));
      return;
    } catch (error) {
      if (serializeError(error).code !== OBJECT_IN_USE) throw error;
    }
    const { activePid } = await readSlotState(client, name);
    if (performance.now() - started > budgetMs) {
      throw new Error(
        `install gave up dropping the replication slot ${name} after ${formatSeconds(performance.now() - started)}: a walsender (pid ${activePid}) took it again each time it was ended. Stop the daemons that stream from it (PURGE_SOURCE=wal), then run this again.`,
      );
    }
    if (activePid === null) continue;
    // pg_terminate_backend(pid, timeout) waits for the walsender to exit, so the retry finds
    // the slot released unless a daemon took it again meanwhile.
    await client.query('SELECT pg_terminate_backend($1, 5000)', [activePid]);
    log.warn(
      'install.walsender_terminated',
      `ended the walsender (pid ${activePid}) streaming from the replication slot ${name}, to drop the slot`,
      { slot: name, pid: activePid },
    );
  }
}

/**
 * Drops every revoke trigger token-reaper's function serves, as the catalog has them (also on
 * a table no longer configured), but on the tables kept. With none kept, it then drops the
 * function and the version rows of the files that made them, so that a switch back to notify
 * applies those files again.
 */
async function dropRevokeTriggers(
  client: pg.Client,
  step: Extract<SourceStep, { kind: 'dropRevokeTriggers' }>,
  patience: Patience,
): Promise<boolean> {
  const label = sourceStepLabel(step);
  const dropped = revokeTriggersBut(await readRevokeTriggers(client), step.keep ?? []);
  for (const table of dropped) {
    // DROP TRIGGER takes ACCESS EXCLUSIVE on the table: short attempts, like every DDL here.
    await inShortLockTransactions(client, label, patience, () =>
      client.query(dropTriggerSql(table, table.trigger)),
    );
  }
  if (step.keep !== null) return dropped.length > 0;
  const leftovers = await client.query<{ present: boolean }>(
    'SELECT to_regprocedure($1) IS NOT NULL AS present',
    [REVOKE_FUNCTION],
  );
  const recorded = await recordedVersions(client);
  const recordsLeft = step.versions.some((version) => recorded.has(version));
  if (!leftovers.rows[0]!.present && !recordsLeft) return dropped.length > 0;
  await inShortLockTransactions(client, label, patience, () =>
    client.query(dropRevokeFunctionSql(recordsLeft ? step.versions : []).join('\n')),
  );
  return true;
}

export function dropTriggerSql(table: Relation, trigger: string) {
  return `DROP TRIGGER IF EXISTS ${escapeIdentifier(trigger)} ON ${quotedName(table)};`;
}

/** The trigger function, and the version rows of the files that made it (none to forget: []). */
function dropRevokeFunctionSql(versions: readonly number[]) {
  return [
    `DROP FUNCTION IF EXISTS ${REVOKE_FUNCTION};`,
    ...(versions.length === 0
      ? []
      : [`DELETE FROM token_reaper.schema_version WHERE version IN (${versions.join(', ')});`]),
  ];
}

function dropLostSlotSql(slot: string) {
  return `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = ${escapeLiteral(slot)} AND database = current_database() AND wal_status = 'lost';`;
}

/** Statements in one transaction, as --print writes them. */
export function transaction(statements: readonly string[]) {
  return ['BEGIN;', ...statements, 'COMMIT;'].join('\n');
}

/**
 * How long a statement that blocks the auth service's writes may wait in the lock queue in one
 * attempt: CREATE TRIGGER (SHARE ROW EXCLUSIVE on the table), an index ON ONLY a partitioned
 * table (SHARE), ATTACH PARTITION (ACCESS EXCLUSIVE on the partition's index, which every write
 * to the partition opens). Every write that comes meanwhile queues behind it, so this is the
 * most install holds up an auth write. Against ordinary traffic the lock comes within
 * milliseconds; only a long transaction makes an attempt give up.
 */
export const DDL_LOCK_ATTEMPT_TIMEOUT_MS = 1_000;
/**
 * The longest pause between two attempts (before jitter, which takes up to half off). Long
 * pauses keep the auth service's writes flowing while a long transaction is in install's way:
 * they queue for at most a second in every six to eleven. Install is not in a hurry.
 */
const DDL_RETRY_PAUSE_LIMIT_MS = 10_000;
const LOCK_NOT_AVAILABLE = '55P03';

export interface Patience {
  watch: BlockerWatch;
  log: Logger;
  /** INSTALL_LOCK_TIMEOUT: how long one DDL transaction, retried, or one build may wait. */
  budgetMs: number;
}

/**
 * Runs `work` in a transaction whose lock waits end after DDL_LOCK_ATTEMPT_TIMEOUT_MS; one that
 * gives up rolls back whole and is tried again after a growing, jittered pause, holding no lock
 * meanwhile, until INSTALL_LOCK_TIMEOUT is spent (the sweep's partition DDL works the same way).
 */
export async function inShortLockTransactions(
  client: pg.Client,
  file: string,
  { watch, log, budgetMs }: Patience,
  work: () => Promise<unknown>,
) {
  let attemptStarted = 0;
  const outcome = await retryOnLockTimeout(
    { lockTimeoutMs: DDL_LOCK_ATTEMPT_TIMEOUT_MS, maxPauseMs: DDL_RETRY_PAUSE_LIMIT_MS, budgetMs },
    async () => {
      attemptStarted = performance.now();
      await inTransaction(client, async () => {
        await client.query(`SELECT set_config('lock_timeout', $1, true)`, [
          `${DDL_LOCK_ATTEMPT_TIMEOUT_MS}ms`,
        ]);
        await work();
      });
    },
    ({ attempt, waitedMs, pauseMs }) => {
      if (pauseMs === null) return;
      const blockers = watch.blockersSince(attemptStarted);
      log.warn(
        'install.lock_timeout',
        `${file} did not get its lock within ${DDL_LOCK_ATTEMPT_TIMEOUT_MS} ms, ${describeBlockers(blockers)}; trying again in ${formatSeconds(pauseMs)}`,
        {
          file,
          attempt,
          lockTimeoutMs: DDL_LOCK_ATTEMPT_TIMEOUT_MS,
          waitedMs,
          retryInMs: pauseMs,
          blockers,
        },
      );
    },
  );
  if ('gaveUp' in outcome) {
    throw new InstallLockTimeoutError(
      file,
      outcome.gaveUp.waitedMs,
      watch.blockersSince(attemptStarted),
      'That step was rolled back whole.',
    );
  }
}

/**
 * CREATE INDEX CONCURRENTLY never blocks the auth service's writes, so it waits in one go,
 * under the session's lock_timeout (INSTALL_LOCK_TIMEOUT), for the transactions it must
 * outlast. Given up, the build leaves an invalid index, which the next install drops first.
 */
async function buildConcurrently(
  client: pg.Client,
  file: string,
  statementSql: string,
  index: NonNullable<InstallStatement['index']>,
  patience: Patience,
) {
  await dropInvalidIndex(client, index, patience.log);
  patience.log.info('install.building_index', `building ${index.name} concurrently`, {
    file,
    index: `${index.schema}.${index.name}`,
  });
  await waitInOneGo(
    client,
    file,
    statementSql,
    patience,
    'The index it was building is left invalid; the next install drops it and builds it again.',
  );
}

/**
 * Runs a statement that blocks no writer while it waits (a concurrent index build or drop, a
 * slot's creation waiting for the transactions in progress) in one go, under the session's
 * lock_timeout. `leftBehind` says what a give-up leaves, in the error.
 */
export async function waitInOneGo(
  client: pg.Client,
  file: string,
  statementSql: string,
  { watch }: Patience,
  leftBehind: string,
) {
  const started = performance.now();
  try {
    await client.query(statementSql);
  } catch (error) {
    if (serializeError(error).code !== LOCK_NOT_AVAILABLE) throw error;
    const blockers = watch.blockersSince(started);
    throw new InstallLockTimeoutError(file, performance.now() - started, blockers, leftBehind);
  }
}

/** Install waited INSTALL_LOCK_TIMEOUT for a lock: a runtime failure (exit 1), worth a retry. */
export class InstallLockTimeoutError extends Error {
  override readonly name = 'InstallLockTimeoutError';
  constructor(
    readonly file: string,
    waitedMs: number,
    readonly blockers: readonly Blocker[],
    /** What the give-up leaves behind, a sentence. */
    leftBehind: string,
  ) {
    super(
      `install gave up on ${file} after waiting ${formatSeconds(waitedMs)} for locks, ${describeBlockers(blockers)}. ` +
        `${leftBehind} ` +
        'Run install again once the transactions in its way have ended; INSTALL_LOCK_TIMEOUT sets how long install waits.',
    );
  }
}

/**
 * A session in install's way, as pg_stat_activity shows it. Never its query: the auth
 * service's statements can carry token values.
 */
export interface Blocker {
  pid: number;
  applicationName: string | null;
  state: string | null;
  /** ISO 8601. */
  xactStart: string | null;
  queryStart: string | null;
  waitEventType: string | null;
}

export interface BlockerWatch {
  /** The step being applied, named in install.waiting. */
  file: string | null;
  /** The blockers found by the latest reading since `since` (performance.now()) that found any. */
  blockersSince(since: number): Blocker[];
  stop(): Promise<void>;
}

/**
 * Often enough to catch the blockers of every DDL attempt (DDL_LOCK_ATTEMPT_TIMEOUT_MS), and
 * cheap: pg_blocking_pids, which takes the lock manager's locks, runs only while install waits.
 */
const BLOCKER_READ_INTERVAL_MS = 500;
/** install.waiting is logged at most this often while install stays blocked. */
const WAITING_LOG_INTERVAL_MS = 5_000;

/**
 * Watches install's session from a second connection while the plan runs, reading
 * pg_blocking_pids, and logs install.waiting with the blockers while it is blocked. Without a
 * second connection install goes on unwatched: the watch explains waits, it bounds none.
 */
async function watchBlockers(
  client: pg.Client,
  settings: InstallSettings,
  log: Logger,
): Promise<BlockerWatch> {
  let latest: { at: number; blockers: Blocker[] } = { at: -Infinity, blockers: [] };
  const watch: BlockerWatch = {
    file: null,
    blockersSince: (since) => (latest.at >= since ? latest.blockers : []),
    stop: async () => undefined,
  };
  const installPid = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid'))
    .rows[0]!.pid;
  let watcher: pg.Client;
  try {
    watcher = await createSessionClient(settings, log, `${APPLICATION_NAME}-install-watch`);
  } catch (error) {
    log.warn(
      'install.watch_failed',
      'could not open a second connection to see what install waits for; going on without it',
      { error },
    );
    return watch;
  }
  const stopping = new AbortController();
  let lastLoggedAt = -Infinity;
  const watching = (async () => {
    while (!stopping.signal.aborted) {
      const blockers = await readBlockers(watcher, installPid);
      const now = performance.now();
      if (blockers.length > 0) {
        latest = { at: now, blockers };
        if (now - lastLoggedAt >= WAITING_LOG_INTERVAL_MS) {
          lastLoggedAt = now;
          log.info(
            'install.waiting',
            `install is waiting for ${watch.file ?? 'a lock'}, ${describeBlockers(blockers)}`,
            { file: watch.file, blockers },
          );
        }
      }
      await delay(BLOCKER_READ_INTERVAL_MS, undefined, { signal: stopping.signal }).catch(
        () => undefined,
      );
    }
  })().catch((error: unknown) => {
    log.warn('install.watch_failed', 'stopped watching what install waits for', { error });
  });
  watch.stop = async () => {
    stopping.abort();
    await watching;
    await watcher.end().catch(() => undefined);
  };
  return watch;
}

// Instants as ISO strings: the log's redaction copies objects member by member, which turns a
// Date into {}.
const instant = z
  .date()
  .nullable()
  .transform((date) => date?.toISOString() ?? null);
const blockerRow = z.object({
  pid: z.number(),
  applicationName: z.string().nullable(),
  state: z.string().nullable(),
  xactStart: instant,
  queryStart: instant,
  waitEventType: z.string().nullable(),
});

async function readBlockers(watcher: pg.Client, installPid: number): Promise<Blocker[]> {
  // pg_blocking_pids is asked only while install waits for a lock; a prepared transaction in
  // the way appears as pid 0, with no session of its own.
  const result = await watcher.query(
    `SELECT DISTINCT blocker.pid, activity.application_name AS "applicationName",
            activity.state, activity.xact_start AS "xactStart",
            activity.query_start AS "queryStart", activity.wait_event_type AS "waitEventType"
     FROM pg_catalog.pg_stat_activity install
     CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(install.pid)) AS blocker(pid)
     LEFT JOIN pg_catalog.pg_stat_activity activity ON activity.pid = blocker.pid
     WHERE install.pid = $1 AND install.wait_event_type = 'Lock'
     ORDER BY blocker.pid`,
    [installPid],
  );
  return result.rows.map((row) => blockerRow.parse(row));
}

/** `held by pid 42 (application "psql", idle in transaction, in a transaction since …)`. */
function describeBlockers(blockers: readonly Blocker[]) {
  if (blockers.length === 0) return 'held by a session install could not see';
  const described = blockers.map((blocker) => {
    const details = [
      blocker.applicationName ? `application ${JSON.stringify(blocker.applicationName)}` : null,
      blocker.state,
      blocker.xactStart ? `in a transaction since ${blocker.xactStart}` : null,
    ].filter((detail) => detail !== null);
    return `pid ${blocker.pid}${details.length > 0 ? ` (${details.join(', ')})` : ''}`;
  });
  return `held by ${described.join(', ')}`;
}

function formatSeconds(milliseconds: number) {
  return `${(milliseconds / 1000).toFixed(1)} s`;
}

// Waiting in pg_advisory_lock() would deadlock with the other installer: that waiting
// statement holds a snapshot, and the other installer's CREATE INDEX CONCURRENTLY waits for
// every snapshot to go away while it holds the lock. So the wait happens here, between
// statements, where this session holds no snapshot at all.
export async function acquireInstallLock(client: pg.Client, log: Logger) {
  let waitMs = 50;
  for (;;) {
    const result = await client.query<{ locked: boolean }>(
      'SELECT pg_try_advisory_lock($1, $2) AS locked',
      [INSTALL_LOCK.classId, INSTALL_LOCK.objectId],
    );
    if (result.rows[0]?.locked) return;
    if (waitMs === 50) {
      log.info('install.waiting', 'another token-reaper install is running; waiting for it');
    }
    await new Promise((resolve) => setTimeout(resolve, waitMs));
    waitMs = Math.min(waitMs * 2, 1_000);
  }
}

/** `"schema"."name"`, for to_regclass. */
function quotedName({ schema, name }: { schema: string; name: string }) {
  return `${escapeIdentifier(schema)}.${escapeIdentifier(name)}`;
}

/**
 * True when something a recorded step made is gone (a trigger or an index dropped by hand, or
 * by an ORM's schema sync), or an index is no longer in place (left invalid by an interrupted
 * uninstall, or its name now another table's): the checksum alone would call the step done.
 */
async function objectsMissing(client: pg.Client, step: InstallStep): Promise<boolean> {
  if (step.triggerTables.length > 0) {
    const result = await client.query<{ missing: boolean }>(
      `SELECT bool_or(NOT EXISTS (
         SELECT 1 FROM pg_catalog.pg_trigger
         WHERE tgrelid = to_regclass(name) AND tgname = $2)) AS missing
       FROM unnest($1::text[]) name`,
      [step.triggerTables, REVOKE_TRIGGER_NAME],
    );
    if (result.rows[0]?.missing === true) return true;
  }
  return (await plannedIndexStates(client, step)).some(({ state }) => state !== 'in place');
}

function plannedIndexes(step: InstallStep): PlannedIndex[] {
  return step.statements.flatMap((statement) =>
    [statement.partitionedIndex, statement.index].flatMap((index) => (index ? [index] : [])),
  );
}

interface PlannedIndexState {
  name: string;
  table: string;
  /**
   * taken: the name is held by another table's index or by a relation that is no index (a
   * table renamed and made again keeps its indexes' names); IF NOT EXISTS would skip the build.
   */
  state: 'in place' | 'missing' | 'invalid' | 'taken';
  /** What holds a taken name. */
  holder: string | null;
}

/** Where each index the step makes stands: the one reading of them for install. */
async function plannedIndexStates(
  client: pg.Client,
  step: InstallStep,
): Promise<PlannedIndexState[]> {
  const indexes = plannedIndexes(step);
  if (indexes.length === 0) return [];
  const result = await client.query<PlannedIndexState>(
    `SELECT planned.name, planned.on_table AS table,
            CASE WHEN c.oid IS NULL THEN 'missing'
                 WHEN i.indrelid IS DISTINCT FROM to_regclass(planned.on_table) THEN 'taken'
                 WHEN NOT i.indisvalid THEN 'invalid'
                 ELSE 'in place' END AS state,
            CASE WHEN i.indrelid IS DISTINCT FROM to_regclass(planned.on_table)
                 THEN coalesce('the index of ' || i.indrelid::regclass::text, 'a ' || CASE c.relkind
                   WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'S' THEN 'sequence'
                   ELSE 'relation' END) END AS holder
     FROM unnest($1::text[], $2::text[]) planned (name, on_table)
     LEFT JOIN pg_catalog.pg_class c ON c.oid = to_regclass(planned.name)
     LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid`,
    [indexes.map(quotedName), indexes.map((index) => quotedName(index.table))],
  );
  return result.rows;
}

/**
 * Stops install when the name of an index it makes is taken: the new table would go without
 * the index while install called it in place. Which of the two to rename is the user's call.
 */
async function refuseTakenIndexNames(client: pg.Client, step: InstallStep) {
  const taken = (await plannedIndexStates(client, step)).filter(({ state }) => state === 'taken');
  if (taken.length === 0) return;
  throw new ConfigurationError(
    taken.map(
      (index) =>
        `${step.file}: install names the index on ${index.table} ${index.name}, but that name is taken by ${index.holder}. ` +
        'Rename or drop that one, then run token-reaper install again.',
    ),
  );
}

export async function recordedVersions(client: pg.Client): Promise<Map<number, string>> {
  const exists = await client.query<{ present: boolean }>(
    `SELECT to_regclass('token_reaper.schema_version') IS NOT NULL AS present`,
  );
  if (!exists.rows[0]?.present) return new Map();
  const rows = await client.query<{ version: number; checksum: string }>(
    'SELECT version, checksum FROM token_reaper.schema_version',
  );
  return new Map(rows.rows.map((row) => [row.version, row.checksum]));
}

async function inTransaction(client: pg.Client, work: () => Promise<void>) {
  await client.query('BEGIN');
  try {
    await work();
    await client.query('COMMIT');
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw error;
  }
}

export async function dropInvalidIndex(
  client: pg.Client,
  index: { schema: string; name: string },
  log: Logger,
) {
  const invalid = await client.query(
    `SELECT 1 FROM pg_catalog.pg_index i
     JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = $1 AND c.relname = $2 AND NOT i.indisvalid`,
    [index.schema, index.name],
  );
  if (invalid.rowCount === 0) return;
  log.warn(
    'install.invalid_index',
    `dropping ${index.name}, left invalid by an interrupted build`,
    {
      index: `${index.schema}.${index.name}`,
    },
  );
  await client.query(
    `DROP INDEX CONCURRENTLY IF EXISTS ${escapeIdentifier(index.schema)}.${escapeIdentifier(index.name)}`,
  );
}

// PostgreSQL truncates names to 63 bytes; doing it here keeps the name we check for invalid
// leftovers the same as the name the server creates.
export function indexName(table: string, column: string) {
  return truncateName(`${table}_${column}_idx`);
}

/**
 * The name as PostgreSQL keeps it: at most `limit` bytes (63, NAMEDATALEN - 1), cut before a
 * character that would not fit whole, as the server's own clipping does. A cut inside one would
 * leave a broken character, which decoding turns into U+FFFD, three bytes of its own.
 */
export function truncateName(name: string, limit = 63) {
  const bytes = Buffer.from(name);
  if (bytes.length <= limit) return name;
  let end = limit;
  // bytes[end] is the first byte left out: while it continues a character, that character
  // began before the cut, and goes too.
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end -= 1;
  return bytes.subarray(0, end).toString();
}

function sqlOf(step: InstallStep) {
  return step.statements.map((statement) => statement.sql).join('\n');
}
