// `install --print --for prisma|typeorm|knex|plain`: the install plan as a migration of the
// tool the auth service already runs its schema with.
//
// Whatever the tool, the plan is cut the same way (ScriptUnit): each file of sql/ that may run
// in a transaction runs in one of its own, with its version row; each statement that may not
// (CREATE INDEX CONCURRENTLY, a replication slot's) runs alone, outside any transaction; and the
// version row of such a file is written after its statements, in a transaction that first checks
// that its indexes exist and are valid (recordAfterIndexes). So a statement that fails never
// leaves a version row behind, whether the tool stops at the first error or goes on.
//
// - typeorm: a migration class with `transaction = false`; each unit is a queryRunner.query(),
//   the transactional ones between startTransaction() and commitTransaction().
// - knex: a CommonJS migration module with `exports.config = { transaction: false }`; each
//   transactional unit in a knex.transaction().
// - prisma: Prisma Migrate applies a migration.sql as one script, which PostgreSQL runs as one
//   implicit transaction unless the script opens its own; CREATE INDEX CONCURRENTLY fails in
//   either. So the plan is several migrations: each non-transactional statement in a
//   migration.sql of its own, the rest in explicit BEGIN/COMMIT blocks.
// - plain: formatInstallPlan, one psql script.
import {
  formatInstallPlan,
  recordAfterIndexes,
  sourceStepUnits,
  type InstallPlan,
  type InstallStep,
  type ScriptUnit,
} from './install.js';

export const INSTALL_FORMATS = ['plain', 'prisma', 'typeorm', 'knex'] as const;
export type InstallFormat = (typeof INSTALL_FORMATS)[number];

/** The plan as `format` prints it; `now` names the migration (its timestamp). */
export function formatInstallPlanFor(
  plan: InstallPlan,
  format: InstallFormat,
  now: Date = new Date(),
): string {
  switch (format) {
    case 'plain':
      return formatInstallPlan(plan);
    case 'typeorm':
      return formatTypeOrm(planUnits(plan), now);
    case 'knex':
      return formatKnex(planUnits(plan), now);
    case 'prisma':
      return formatPrisma(planUnits(plan), now);
  }
}

/** The plan in the order install runs it, as transactions and lone statements. */
export function planUnits(plan: InstallPlan): ScriptUnit[] {
  return [...plan.steps.flatMap(stepUnits), ...plan.source.flatMap(sourceStepUnits)];
}

function stepUnits(step: InstallStep): ScriptUnit[] {
  const comment = step.file;
  if (step.transactional) {
    return [
      {
        transaction: true,
        comment,
        statements: [...step.statements.map((statement) => statement.sql), step.recordSql],
      },
    ];
  }
  return [
    ...step.statements.map((statement): ScriptUnit =>
      statement.index
        ? {
            transaction: false,
            comment: `${comment} (outside a transaction: CREATE INDEX CONCURRENTLY cannot run in one)`,
            statement: statement.sql,
          }
        : { transaction: true, comment, statements: [statement.sql] },
    ),
    {
      transaction: true,
      comment: `${comment}: recorded once its indexes are built and valid`,
      statements: recordAfterIndexes(step),
    },
  ];
}

const NOT_REVERSIBLE =
  'token-reaper: this migration is not reversed by the ORM; run `token-reaper uninstall` (or review `token-reaper uninstall --print`) to remove what it made';

/** `20261205211500`: Prisma's migration prefix, UTC. */
function compactTimestamp(now: Date) {
  return now
    .toISOString()
    .replace(/\.\d+Z$/, '')
    .replace(/\D/g, '');
}

/** A JavaScript template literal whose value is `text`. */
function templateLiteral(text: string) {
  return `\`${text.replace(/\\/g, '\\\\').replace(/`/g, '\\`').replace(/\$\{/g, '\\${')}\``;
}

/** `text` as lines of `// ` comments at `indent`. */
function lineComment(text: string, indent = '') {
  return text
    .split('\n')
    .map((line) => (line === '' ? `${indent}//` : `${indent}// ${line}`))
    .join('\n');
}

const HEADER_LINES = [
  "token-reaper install, rendered for this database's tables and configuration.",
  'Each file of its SQL runs in a transaction of its own with its row in',
  'token_reaper.schema_version; CREATE INDEX CONCURRENTLY runs alone, outside any transaction,',
  'and its row is written after it, once the index is valid. A statement that fails leaves no',
  'row: `token-reaper install` then does what is missing, and after a complete run finds',
  'everything in place.',
];

function formatTypeOrm(units: readonly ScriptUnit[], now: Date) {
  const name = `TokenReaperInstall${now.getTime()}`;
  const body = units.map((unit) => {
    const comment = lineComment(unit.comment, '    ');
    if (!unit.transaction) {
      return `${comment}\n    await queryRunner.query(${templateLiteral(unit.statement)});`;
    }
    const statements = unit.statements
      .map((statement) => `      ${templateLiteral(statement)},`)
      .join('\n');
    return `${comment}\n    await inTransaction(queryRunner, [\n${statements}\n    ]);`;
  });
  return `${lineComment(
    [
      'Made by `token-reaper install --print --for typeorm`. Save it among your migrations.',
      ...HEADER_LINES,
      '',
      'It manages its transactions itself (transaction = false), which TypeORM allows only with',
      "migrationsTransactionMode: 'each' (or 'none') in the DataSource's options: under the",
      "default, 'all', TypeORM refuses to run it (ForbiddenTransactionModeOverrideError).",
    ].join('\n'),
  )}
import type { MigrationInterface, QueryRunner } from 'typeorm';

export class ${name} implements MigrationInterface {
  name = '${name}';
  transaction = false as const;

  async up(queryRunner: QueryRunner): Promise<void> {
${body.join('\n')}
  }

  async down(): Promise<void> {
    throw new Error(${JSON.stringify(NOT_REVERSIBLE)});
  }
}

/** The statements in one transaction: all of them, or none. */
async function inTransaction(queryRunner: QueryRunner, statements: string[]): Promise<void> {
  await queryRunner.startTransaction();
  try {
    for (const statement of statements) await queryRunner.query(statement);
    await queryRunner.commitTransaction();
  } catch (error) {
    await queryRunner.rollbackTransaction();
    throw error;
  }
}
`;
}

/**
 * knex.raw() turns each `?` into a bind parameter (`$1`), even with no bindings; `\?` stays a
 * question mark. The SQL's backslashes are its own (standard_conforming_strings), so a `?` right
 * after one would lose it: none of token-reaper's SQL has one.
 */
function knexLiteral(text: string) {
  return templateLiteral(text).replace(/\?/g, '\\\\?');
}

function formatKnex(units: readonly ScriptUnit[], now: Date) {
  const body = units.map((unit) => {
    const comment = lineComment(unit.comment, '  ');
    if (!unit.transaction) return `${comment}\n  await knex.raw(${knexLiteral(unit.statement)});`;
    const statements = unit.statements
      .map((statement) => `    await trx.raw(${knexLiteral(statement)});`)
      .join('\n');
    return `${comment}\n  await knex.transaction(async (trx) => {\n${statements}\n  });`;
  });
  return `${lineComment(
    [
      `Made by \`token-reaper install --print --for knex\`. Save it as`,
      `migrations/${compactTimestamp(now)}_token_reaper_install.js (.cjs in a package with`,
      '"type": "module": it is a CommonJS module).',
      ...HEADER_LINES,
      '',
      'It manages its transactions itself: config.transaction = false keeps Knex from wrapping it',
      'in one.',
    ].join('\n'),
  )}
exports.config = { transaction: false };

exports.up = async function up(knex) {
${body.join('\n')}
};

exports.down = async function down() {
  throw new Error(${JSON.stringify(NOT_REVERSIBLE)});
};
`;
}

/** The marker that starts each file in --for prisma's output; the path follows it. */
export const PRISMA_FILE_MARKER = '-- file: ';

function formatPrisma(units: readonly ScriptUnit[], now: Date) {
  // Consecutive transactions share a migration; a lone statement has one of its own.
  const migrations: ScriptUnit[][] = [];
  for (const unit of units) {
    const last = migrations.at(-1);
    if (unit.transaction && last?.[0]?.transaction) last.push(unit);
    else migrations.push([unit]);
  }
  const timestamp = compactTimestamp(now);
  const width = String(migrations.length).length;
  const files = migrations.map((group, index) => {
    const directory = `${timestamp}_token_reaper_${String(index + 1).padStart(width, '0')}`;
    const body = group
      .map((unit) =>
        unit.transaction
          ? `-- ${unit.comment}\nBEGIN;\n${unit.statements.join('\n')}\nCOMMIT;`
          : unit.statement,
      )
      .join('\n\n');
    const note = group[0]!.transaction
      ? ''
      : `-- ${group[0]!.comment}; the only statement of its migration.sql\n`;
    return `${PRISMA_FILE_MARKER}prisma/migrations/${directory}/migration.sql\n${note}${body}\n`;
  });
  return `${[
    '-- Made by `token-reaper install --print --for prisma`: several Prisma Migrate migrations,',
    `-- ${migrations.length} files, each starting at its "${PRISMA_FILE_MARKER.trim()} <path>" line. Save each under its path, then`,
    '-- run `prisma migrate deploy` (or `prisma migrate dev`).',
    ...HEADER_LINES.map((line) => `-- ${line}`),
    '-- Prisma runs a migration.sql as one script, which PostgreSQL runs in one implicit',
    '-- transaction unless it opens its own: a CREATE INDEX CONCURRENTLY must be alone in its file.',
    '',
    ...files,
  ].join('\n')}`;
}
