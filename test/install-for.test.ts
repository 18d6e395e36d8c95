// `install --print --for typeorm|knex|prisma|plain` on a real PostgreSQL: each output runs as that
// tool's migration (TypeORM's and Knex's own migration runners, run for real; Prisma's script
// through psql, as its engine sends it, since the engine cannot be downloaded here), after
// which `install` finds everything in place. And a statement that fails leaves no version row,
// in `install` itself and in every printed format.
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { expect } from 'chai';
import knex from 'knex';
import { DataSource, EntitySchema, type EntitySchemaIndexOptions } from 'typeorm';
import ts from 'typescript';
import { PRISMA_FILE_MARKER } from '../src/install-formats.js';
import { repositoryRoot, runCli, spawnDaemon } from './support/cli.js';
import { createTestDatabase, type TestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';
import { ALL_SQL_FILES } from './support/sql-files.js';

const run = promisify(execFile);

const ALL_FILES: readonly string[] = ALL_SQL_FILES;
const ALL_VERSIONS = [1, 2, 3, 4, 5, 7, 8];
/** What `install` finds in place on the reference schema under PURGE_SOURCE=notify. */
const EVERYTHING = [
  ...ALL_FILES,
  'drop replication slot token_reaper',
  'drop publication token_reaper',
];

type Format = 'plain' | 'prisma' | 'typeorm' | 'knex';

/** A fresh database with the reference schema for `work`, dropped afterwards, pass or fail. */
async function withReferenceDatabase(
  label: string,
  work: (database: TestDatabase, environment: Record<string, string>) => Promise<void>,
) {
  const database = await createTestDatabase(label);
  try {
    await createReferenceSchema(database);
    await work(database, { DATABASE_URL: database.url });
  } finally {
    await database.drop();
  }
}

/**
 * A fresh database whose refresh tokens are partitioned by expiry, for `work`: install builds
 * each index ON ONLY the parent, then concurrently on each partition, and attaches it.
 */
async function withPartitionedDatabase(
  label: string,
  work: (database: TestDatabase, environment: Record<string, string>) => Promise<void>,
) {
  const database = await createTestDatabase(label);
  try {
    await database.query(
      `CREATE TABLE public.refresh_tokens (id uuid NOT NULL, user_id uuid NOT NULL,
         token_hash text NOT NULL, revoked boolean NOT NULL DEFAULT false,
         expires_at timestamptz NOT NULL, PRIMARY KEY (id, expires_at))
       PARTITION BY RANGE (expires_at)`,
    );
    await database.query(
      `CREATE TABLE public.refresh_tokens_a PARTITION OF public.refresh_tokens
       FOR VALUES FROM (MINVALUE) TO ('2030-01-01')`,
    );
    await database.query(
      `CREATE TABLE public.refresh_tokens_b PARTITION OF public.refresh_tokens DEFAULT`,
    );
    await work(database, { DATABASE_URL: database.url, PASSWORD_RESETS_TABLE: 'none' });
  } finally {
    await database.drop();
  }
}

async function printFor(format: Format, environment: Record<string, string>) {
  const printed = await runCli(['install', '--print', '--for', format], environment);
  expect(printed.code, printed.stderr).to.equal(0);
  return printed.stdout;
}

async function versions(database: TestDatabase) {
  const schema = await database.query(
    `SELECT to_regclass('token_reaper.schema_version') IS NOT NULL AS present`,
  );
  if (!schema[0]!.present) return [];
  const rows = await database.query<{ version: number }>(
    'SELECT version FROM token_reaper.schema_version ORDER BY version',
  );
  return rows.map((row) => row.version);
}

function installFinished(result: Awaited<ReturnType<typeof runCli>>) {
  expect(result.code, result.stderr + result.stdout).to.equal(0);
  const line = result.logs.find((candidate) => candidate.event === 'install.finished');
  expect(line, result.stdout).not.to.equal(undefined);
  return line as unknown as { applied: string[]; unchanged: string[] };
}

/** A second `install` applies nothing; `explain` and the daemon find nothing to complain about. */
async function expectEverythingInPlace(
  database: TestDatabase,
  environment: Record<string, string>,
) {
  expect(await versions(database)).to.deep.equal(ALL_VERSIONS);
  const again = installFinished(await runCli(['install'], environment));
  expect(again.applied).to.deep.equal([]);
  expect(again.unchanged).to.deep.equal(EVERYTHING);
  const explain = await runCli(['explain', '--json'], environment);
  expect(explain.code, explain.stderr + explain.stdout).to.equal(0);
  expect((JSON.parse(explain.stdout) as { problems: unknown[] }).problems).to.deep.equal([]);
  const daemon = spawnDaemon(['start'], environment);
  try {
    await daemon.waitForLog('listener.caught_up');
    expect(
      daemon.logs.filter((line) => line.level === 'error' || line.level === 'warn'),
    ).to.deep.equal([]);
  } finally {
    await daemon.kill();
  }
}

/** Makes every CREATE INDEX fail: a build that fails, deterministically. */
async function refuseIndexBuilds(database: TestDatabase) {
  await database.query(
    `CREATE FUNCTION public.refuse_index_builds() RETURNS event_trigger LANGUAGE plpgsql AS $$
     BEGIN RAISE EXCEPTION 'no index builds here today'; END $$`,
  );
  await database.query(
    `CREATE EVENT TRIGGER refuse_index_builds ON ddl_command_start
     WHEN TAG IN ('CREATE INDEX') EXECUTE FUNCTION public.refuse_index_builds()`,
  );
  return () => database.query('DROP EVENT TRIGGER refuse_index_builds');
}

/** The --for prisma output as its files, in the order Prisma applies them (by directory). */
function prismaFiles(printed: string) {
  const files: { path: string; sql: string }[] = [];
  for (const line of printed.split('\n')) {
    if (line.startsWith(PRISMA_FILE_MARKER)) {
      files.push({ path: line.slice(PRISMA_FILE_MARKER.length), sql: '' });
    } else if (files.length > 0) {
      files.at(-1)!.sql += `${line}\n`;
    }
  }
  return files.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

/**
 * Applies the migration.sql files as Prisma's schema engine does on PostgreSQL: each file's
 * whole text as one simple-protocol query (`psql -c` sends it so), which PostgreSQL runs as one
 * implicit transaction unless the text opens its own; the first failure stops the run.
 */
async function applyLikePrisma(database: TestDatabase, files: readonly { sql: string }[]) {
  for (const file of files) {
    await run('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', database.url, '-c', file.sql]);
  }
}

/** psql -f, going on after errors unless ON_ERROR_STOP is set. */
async function applyWithPsql(
  database: TestDatabase,
  directory: string,
  sql: string,
  { stopOnError }: { stopOnError: boolean },
) {
  const file = path.join(directory, `plan-${Math.random().toString(36).slice(2)}.sql`);
  await writeFile(file, sql);
  return run('psql', [
    '-X',
    '-q',
    ...(stopOnError ? ['-v', 'ON_ERROR_STOP=1'] : []),
    '-d',
    database.url,
    '-f',
    file,
  ]);
}

/** Type-checks the TypeORM migration against TypeORM's own types, strictly. */
function typeCheck(file: string) {
  const program = ts.createProgram([file], {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    skipLibCheck: true,
    types: [],
  });
  const diagnostics = ts.getPreEmitDiagnostics(program);
  return diagnostics.map((diagnostic) =>
    ts.flattenDiagnosticMessageText(diagnostic.messageText, '\n'),
  );
}

async function runTypeOrmMigrations(
  database: TestDatabase,
  directory: string,
  migrationsTransactionMode: 'all' | 'each' = 'each',
) {
  const dataSource = new DataSource({
    type: 'postgres',
    url: database.url,
    migrations: [path.join(directory, '*.ts')],
    migrationsTransactionMode,
    logging: false,
  });
  await dataSource.initialize();
  try {
    return await dataSource.runMigrations();
  } finally {
    await dataSource.destroy();
  }
}

async function runKnexMigrations(database: TestDatabase, directory: string) {
  const client = knex({ client: 'pg', connection: database.url });
  try {
    return (await client.migrate.latest({ directory })) as [number, string[]];
  } finally {
    await client.destroy();
  }
}

describe('install --print --for', () => {
  let directory: string;
  let counter = 0;
  /** A directory of its own for one project's migrations, inside the run's temporary one. */
  async function projectDirectory(name: string) {
    const project = path.join(directory, `${name}-${++counter}`);
    await mkdir(project);
    return project;
  }
  /** The TypeORM migration saved in a project directory, as `migration:create` would. */
  async function saveTypeOrmMigration(printed: string) {
    const project = await projectDirectory('typeorm');
    const name = /export class (TokenReaperInstall\d{13}) /.exec(printed)![1]!;
    const file = path.join(project, `${name}.ts`);
    await writeFile(file, printed);
    return { project, file, name };
  }
  async function saveKnexMigration(printed: string) {
    const project = await projectDirectory('knex');
    const name = /migrations\/(\d{14}_token_reaper_install\.js)/.exec(printed)![1]!;
    await writeFile(path.join(project, name), printed);
    return { project, name };
  }

  before(async () => {
    directory = await mkdtemp(path.join(tmpdir(), 'token-reaper-orm-'));
    // The generated TypeScript imports types from 'typeorm', resolved as in the user's project.
    await symlink(path.join(repositoryRoot, 'node_modules'), path.join(directory, 'node_modules'));
  });
  after(async () => {
    if (directory) await rm(directory, { recursive: true, force: true });
  });

  it('prints plain SQL by default, and refuses an unknown format or --for without --print', async () => {
    await withReferenceDatabase('install_for_flags', async (_database, environment) => {
      const plain = await runCli(['install', '--print'], environment);
      expect(await printFor('plain', environment)).to.equal(plain.stdout);
      const unknown = await runCli(['install', '--print', '--for', 'sequelize'], environment);
      expect(unknown.code).to.equal(2);
      expect(unknown.stderr).to.include('use plain, prisma, typeorm, knex');
      const alone = await runCli(['install', '--for', 'knex'], environment);
      expect(alone.code).to.equal(2);
      expect(alone.stderr).to.include('install --for goes with --print');
    });
  });

  it('typeorm: a migration class that TypeORM runs, after which install finds everything in place', async () => {
    await withReferenceDatabase('install_for_typeorm', async (database, environment) => {
      const printed = await printFor('typeorm', environment);
      expect(printed).to.match(
        /export class TokenReaperInstall\d{13} implements MigrationInterface/,
      );
      expect(printed).to.include('transaction = false as const;');
      const { project, file, name } = await saveTypeOrmMigration(printed);
      expect(typeCheck(file)).to.deep.equal([]);
      // Under TypeORM's default mode, one transaction for all, it refuses the migration.
      let refusal: unknown;
      await runTypeOrmMigrations(database, project, 'all').catch((error: unknown) => {
        refusal = error;
      });
      expect((refusal as Error | undefined)?.name).to.equal(
        'ForbiddenTransactionModeOverrideError',
      );
      expect(await versions(database)).to.deep.equal([]);
      const applied = await runTypeOrmMigrations(database, project);
      expect(applied.map((migration) => migration.name)).to.deep.equal([name]);
      await expectEverythingInPlace(database, environment);
      // TypeORM itself finds nothing left to run.
      expect(await runTypeOrmMigrations(database, project)).to.deep.equal([]);
    });
  });

  it('knex: a migration module that Knex runs, after which install finds everything in place', async () => {
    await withReferenceDatabase('install_for_knex', async (database, environment) => {
      const printed = await printFor('knex', environment);
      expect(printed).to.include('exports.config = { transaction: false };');
      const { project, name } = await saveKnexMigration(printed);
      const [, applied] = await runKnexMigrations(database, project);
      expect(applied).to.deep.equal([name]);
      await expectEverythingInPlace(database, environment);
      const [, again] = await runKnexMigrations(database, project);
      expect(again).to.deep.equal([]);
    });
  });

  it('prisma: migration.sql files that apply as Prisma sends them, each index build alone in its file', async () => {
    await withReferenceDatabase('install_for_prisma', async (database, environment) => {
      const printed = await printFor('prisma', environment);
      const files = prismaFiles(printed);
      for (const file of files) {
        expect(file.path).to.match(/^prisma\/migrations\/\d{14}_token_reaper_\d+\/migration\.sql$/);
        if (file.sql.includes('CONCURRENTLY')) {
          // One statement, no transaction: CONCURRENTLY fails in a multi-statement script.
          expect(file.sql).not.to.include('BEGIN;');
          expect(
            file.sql
              .replace(/^--.*$/gm, '')
              .trim()
              .split(';')
              .filter((part) => part.trim()),
          ).to.have.length(1);
        }
      }
      expect(files.filter((file) => file.sql.includes('CONCURRENTLY'))).to.have.length(3);
      await applyLikePrisma(database, files);
      await expectEverythingInPlace(database, environment);
    });
  });

  it('plain: applies with psql -v ON_ERROR_STOP=1 -f, after which install finds everything in place', async () => {
    await withReferenceDatabase('install_for_plain', async (database, environment) => {
      await applyWithPsql(database, directory, await printFor('plain', environment), {
        stopOnError: true,
      });
      await expectEverythingInPlace(database, environment);
    });
  });

  for (const format of ['knex', 'prisma'] as const) {
    it(`${format}: on a table partitioned by expiry, builds each partition's index and attaches it`, async () => {
      await withPartitionedDatabase(
        `install_for_partitioned_${format}`,
        async (database, environment) => {
          const printed = await printFor(format, environment);
          expect(printed).to.include('ON ONLY "public"."refresh_tokens"');
          expect(printed).to.include('ATTACH PARTITION "public"."refresh_tokens_b_expires_at_idx"');
          if (format === 'knex') {
            const { project } = await saveKnexMigration(printed);
            await runKnexMigrations(database, project);
          } else {
            await applyLikePrisma(database, prismaFiles(printed));
          }
          const indexes = await database.query(
            `SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           WHERE c.relnamespace = 'public'::regnamespace AND NOT i.indisprimary ORDER BY 1`,
          );
          expect(indexes).to.deep.equal(
            [
              'refresh_tokens_a_expires_at_idx',
              'refresh_tokens_a_revoked_idx',
              'refresh_tokens_b_expires_at_idx',
              'refresh_tokens_b_revoked_idx',
              'refresh_tokens_expires_at_idx',
              'refresh_tokens_revoked_idx',
            ].map((name) => ({ name, valid: true })),
          );
          await expectEverythingInPlace(database, environment);
        },
      );
    });
  }

  it("typeorm: schema sync drops token-reaper's indexes unless the entity names them with synchronize: false", async () => {
    await withReferenceDatabase('install_for_typeorm_sync', async (database, environment) => {
      installFinished(await runCli(['install'], environment));
      /** What `schema:sync` would run, and `migration:generate` would write, for the entity. */
      const schemaSync = async (indices: EntitySchemaIndexOptions[]) => {
        const refreshToken = new EntitySchema({
          name: 'RefreshToken',
          tableName: 'refresh_tokens',
          columns: {
            id: { type: 'uuid', primary: true, generated: 'uuid' },
            userId: { name: 'user_id', type: 'uuid' },
            tokenHash: { name: 'token_hash', type: 'text', unique: true },
            revoked: { type: 'boolean', default: false },
            expiresAt: { name: 'expires_at', type: 'timestamptz' },
            createdAt: { name: 'created_at', type: 'timestamptz', createDate: true },
          },
          indices,
        });
        const dataSource = new DataSource({
          type: 'postgres',
          url: database.url,
          entities: [refreshToken],
          logging: false,
        });
        await dataSource.initialize();
        try {
          const log = await dataSource.driver.createSchemaBuilder().log();
          return log.upQueries.map((query) => query.query).filter((sql) => /DROP INDEX/i.test(sql));
        } finally {
          await dataSource.destroy();
        }
      };
      // What the issue saw: a DROP INDEX for each of token-reaper's indexes on the table.
      const undeclared = await schemaSync([]);
      expect(undeclared.join('\n')).to.include('refresh_tokens_expires_at_idx');
      expect(undeclared.join('\n')).to.include('refresh_tokens_revoked_idx');
      // As docs/operations.md says: named on the entity, with synchronize: false.
      const declared = await schemaSync([
        { name: 'refresh_tokens_expires_at_idx', synchronize: false },
        { name: 'refresh_tokens_revoked_idx', synchronize: false },
      ]);
      expect(declared.join('\n')).not.to.match(/refresh_tokens_(expires_at|revoked)_idx/);
    });
  });

  describe('never leaves a version row for SQL that failed', () => {
    // Each run stops at the failed index build of 004, having committed 001 to 003; psql
    // without ON_ERROR_STOP goes on, and builds nothing either, but records 007 and 008.
    const runs: Record<
      string,
      (database: TestDatabase, environment: Record<string, string>) => Promise<number[]>
    > = {
      install: async (_database, environment) => {
        const result = await runCli(['install'], environment);
        expect(result.code).to.equal(1);
        expect(result.stderr).to.include('no index builds here today');
        return [1, 2, 3];
      },
      typeorm: async (database, environment) => {
        const { project } = await saveTypeOrmMigration(await printFor('typeorm', environment));
        let failure: unknown;
        await runTypeOrmMigrations(database, project).catch((error: unknown) => (failure = error));
        expect(String(failure)).to.include('no index builds here today');
        return [1, 2, 3];
      },
      knex: async (database, environment) => {
        const { project } = await saveKnexMigration(await printFor('knex', environment));
        let failure: unknown;
        await runKnexMigrations(database, project).catch((error: unknown) => (failure = error));
        expect(String(failure)).to.include('no index builds here today');
        return [1, 2, 3];
      },
      prisma: async (database, environment) => {
        const files = prismaFiles(await printFor('prisma', environment));
        let failure: unknown;
        await applyLikePrisma(database, files).catch((error: unknown) => (failure = error));
        expect(String((failure as { stderr?: string }).stderr)).to.include(
          'no index builds here today',
        );
        return [1, 2, 3];
      },
      'plain, psql going on after errors': async (database, environment) => {
        const { stderr } = await applyWithPsql(
          database,
          directory,
          await printFor('plain', environment),
          { stopOnError: false },
        );
        expect(stderr).to.include('no index builds here today');
        expect(stderr).to.include('is missing or invalid, so it is not recorded');
        return [1, 2, 3, 7, 8];
      },
    };
    for (const [name, apply] of Object.entries(runs)) {
      it(`${name}: a failed index build is not recorded, and install builds it afterwards`, async () => {
        await withReferenceDatabase(`install_for_fail_${name}`, async (database, environment) => {
          const allowIndexBuilds = await refuseIndexBuilds(database);
          const recorded = await apply(database, environment);
          expect(await versions(database)).to.deep.equal(recorded);
          await allowIndexBuilds();
          const install = installFinished(await runCli(['install'], environment));
          expect(install.applied).to.include.members([
            '004-expiry-index.sql',
            '005-marker-index.sql',
          ]);
          expect(await versions(database)).to.deep.equal(ALL_VERSIONS);
        });
      });
    }

    it('install: a file whose transaction fails is not recorded (a conflicting function)', async () => {
      await withReferenceDatabase('install_for_fail_conflict', async (database, environment) => {
        // An object of the name 002 makes, which CREATE OR REPLACE cannot replace.
        await database.query('CREATE SCHEMA token_reaper');
        await database.query(
          `CREATE FUNCTION token_reaper.notify_revoked() RETURNS integer LANGUAGE sql AS 'SELECT 1'`,
        );
        const result = await runCli(['install'], environment);
        expect(result.code).to.equal(1);
        expect(result.stderr).to.include('cannot change return type of existing function');
        expect(await versions(database)).to.deep.equal([1]);
        // psql without ON_ERROR_STOP goes on: 002 and 003 (whose trigger needs 002's function)
        // fail and stay unrecorded, the rest is recorded.
        const { stderr } = await applyWithPsql(
          database,
          directory,
          await printFor('plain', environment),
          { stopOnError: false },
        );
        expect(stderr).to.include('cannot change return type of existing function');
        expect(await versions(database)).to.deep.equal([1, 4, 5, 7, 8]);
      });
    });
  });
});
