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
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import type pg from 'pg';
import { sql, type CommonQueryMethods } from 'slonik';
import { z } from 'zod';
import { escapeIdentifier, escapeLiteral } from 'pg';
import type { Config } from './config.js';
import { NewerSchemaVersionError } from './errors.js';
import type { Logger } from './logger.js';
import {
  expiryTimeColumn,
  markerColumn,
  qualifiedName,
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
  /** Records the step in token_reaper.schema_version. */
  recordSql: string;
}

export interface InstallStatement {
  sql: string;
  /** The index it builds concurrently, checked for an invalid leftover first. */
  index: { schema: string; name: string } | null;
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
      return {
        version: Number(file.slice(0, 3)),
        file,
        text,
        scope,
        transactional: settings.get('transaction') !== 'none',
        indexVariable: settings.get('index') ?? null,
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

export async function buildInstallPlan(
  config: Pick<Config, 'notifyChannel'>,
  shapes: readonly TableShape[],
  attachedIndexes: AttachedIndexes = new Map(),
  directory = SQL_DIRECTORY,
): Promise<InstallStep[]> {
  const files = (await readSqlFiles(directory)).filter(
    (file) => file.scope === 'all' || shapes.some((shape) => inScope(file, shape)),
  );
  return files.map((file) => {
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
      recordSql:
        `INSERT INTO token_reaper.schema_version (version, name, checksum) ` +
        `VALUES (${file.version}, ${escapeLiteral(file.file)}, ${escapeLiteral(checksum)}) ` +
        `ON CONFLICT (version) DO UPDATE SET name = EXCLUDED.name, ` +
        `checksum = EXCLUDED.checksum, applied_at = now();`,
    };
  });
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
      if (!shape.partitioned) return [{ sql, index: { schema: shape.relation.schema, name } }];
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
  const statements: InstallStatement[] = [{ sql: onlyParent, index: null }];
  // Partitions made after the parent's index existed already have theirs.
  for (const leaf of shape.leaves.filter((leaf) => !attached.has(qualifiedName(leaf)))) {
    const leafVariables = templateVariables(config, shape, leaf);
    const leafIndex = (leafVariables.get(file.indexVariable!) as { identifier: string }).identifier;
    statements.push({
      sql: renderSql(file.text, leafVariables, file.file).trim(),
      index: { schema: leaf.schema, name: leafIndex },
    });
    statements.push({
      sql: `ALTER INDEX ${escapeIdentifier(shape.relation.schema)}.${escapeIdentifier(parentIndex)} ATTACH PARTITION ${escapeIdentifier(leaf.schema)}.${escapeIdentifier(leafIndex)};`,
      index: null,
    });
  }
  return statements;
}

/** The plan as one SQL script, for a DBA to review or to put into their own migrations. */
export function formatInstallPlan(steps: readonly InstallStep[]): string {
  const parts = ['-- token-reaper install plan: the SQL `token-reaper install` runs, in order.'];
  for (const step of steps) {
    parts.push(
      step.transactional
        ? `-- ${step.file}\nBEGIN;\n${sqlOf(step)}\n${step.recordSql}\nCOMMIT;`
        : `-- ${step.file} (outside a transaction: CREATE INDEX CONCURRENTLY cannot run in one)\n${sqlOf(step)}\n${step.recordSql}`,
    );
  }
  return `${parts.join('\n\n')}\n`;
}

export interface InstallResult {
  applied: string[];
  unchanged: string[];
}

export async function applyInstallPlan(
  client: pg.Client,
  steps: readonly InstallStep[],
  logger: Logger,
): Promise<InstallResult> {
  const log = logger.child('install');
  await acquireInstallLock(client, log);
  try {
    const recorded = await recordedVersions(client);
    const newest = Math.max(0, ...recorded.keys());
    const known = Math.max(0, ...steps.map((step) => step.version));
    if (newest > known) {
      throw new NewerSchemaVersionError([
        `the database's token_reaper schema is at version ${newest}, newer than this token-reaper knows (${known}). Upgrade token-reaper.`,
      ]);
    }
    const result: InstallResult = { applied: [], unchanged: [] };
    for (const step of steps) {
      if (recorded.get(step.version) === step.checksum) {
        result.unchanged.push(step.file);
        continue;
      }
      const started = performance.now();
      if (step.transactional) {
        await inTransaction(client, async () => {
          await client.query(sqlOf(step));
          await client.query(step.recordSql);
        });
      } else {
        for (const statement of step.statements) {
          if (statement.index) {
            await dropInvalidIndex(client, statement.index, log);
            log.info('install.building_index', `building ${statement.index.name} concurrently`, {
              file: step.file,
              index: `${statement.index.schema}.${statement.index.name}`,
            });
          }
          await client.query(statement.sql);
        }
        await client.query(step.recordSql);
      }
      result.applied.push(step.file);
      log.info('install.applied', `applied ${step.file}`, {
        file: step.file,
        version: step.version,
        durationMs: Math.round(performance.now() - started),
      });
    }
    return result;
  } finally {
    await client.query('SELECT pg_advisory_unlock($1, $2)', [
      INSTALL_LOCK.classId,
      INSTALL_LOCK.objectId,
    ]);
  }
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

async function recordedVersions(client: pg.Client): Promise<Map<number, string>> {
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

export function truncateName(name: string) {
  return Buffer.from(name).subarray(0, 63).toString();
}

function sqlOf(step: InstallStep) {
  return step.statements.map((statement) => statement.sql).join('\n');
}
