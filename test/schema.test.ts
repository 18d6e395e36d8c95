// Introspection decides what "dead" means for a table, so every shape it accepts and every
// shape it refuses is pinned here, on a real catalog.
import { expect } from 'chai';
import type { DatabasePool } from 'slonik';
import { loadConfig } from '../src/config.js';
import { createDatabasePool } from '../src/db.js';
import { SchemaError } from '../src/errors.js';
import { describeTarget, type TableShape } from '../src/schema.js';
import { createCapturingLogger } from './support/capture-logger.js';
import { useTestDatabase } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

describe('schema introspection', () => {
  const database = useTestDatabase('schema');
  let pool: DatabasePool;

  before(async () => {
    const config = loadConfig({ DATABASE_URL: database.url });
    pool = await createDatabasePool(config, createCapturingLogger().logger, { maximumPoolSize: 2 });
    await createReferenceSchema(database.current, { schema: 'plain' });
    await createReferenceSchema(database.current, {
      schema: 'stamped',
      revokedShape: 'timestamp',
      usedShape: 'timestamp',
    });
  });
  after(() => pool.end());

  const describe_ = async (
    environment: Record<string, string>,
    which: 'refreshTokens' | 'passwordResets' = 'refreshTokens',
  ) => {
    const config = loadConfig({ DATABASE_URL: database.url, ...environment });
    const rule = config.targets[which === 'refreshTokens' ? 0 : 1]!;
    return (await describeTarget(pool, rule, config))!;
  };
  const markerOf = (shape: TableShape) =>
    shape.marker === null
      ? null
      : shape.marker.kind === 'flag'
        ? { column: shape.marker.column, kind: 'flag' }
        : { column: shape.marker.time.column, kind: 'time' };

  async function schemaProblems(environment: Record<string, string>) {
    try {
      await describe_(environment);
    } catch (error) {
      expect(error).to.be.instanceOf(SchemaError);
      return (error as SchemaError).problems;
    }
    expect.fail('the table was accepted');
  }

  it('finds a boolean revoked column and a boolean used column', async () => {
    const tokens = await describe_({ REFRESH_TOKENS_TABLE: 'plain.refresh_tokens' });
    expect(markerOf(tokens)).to.deep.equal({ column: 'revoked', kind: 'flag' });
    expect(tokens.partitioned).to.equal(false);
    expect(tokens.relation).to.deep.equal({ schema: 'plain', name: 'refresh_tokens' });
    const resets = await describe_(
      { PASSWORD_RESETS_TABLE: 'plain.password_resets' },
      'passwordResets',
    );
    expect(markerOf(resets)).to.deep.equal({ column: 'used', kind: 'flag' });
  });

  it('finds revoked_at and used_at timestamps', async () => {
    const tokens = await describe_({ REFRESH_TOKENS_TABLE: 'stamped.refresh_tokens' });
    expect(markerOf(tokens)).to.deep.equal({ column: 'revoked_at', kind: 'time' });
    const resets = await describe_(
      { PASSWORD_RESETS_TABLE: 'stamped.password_resets' },
      'passwordResets',
    );
    expect(markerOf(resets)).to.deep.equal({ column: 'used_at', kind: 'time' });
  });

  it('resolves an unqualified name through the search_path', async () => {
    await database.query('CREATE TABLE public.refresh_tokens (LIKE plain.refresh_tokens)');
    const tokens = await describe_({});
    expect(tokens.relation).to.deep.equal({ schema: 'public', name: 'refresh_tokens' });
  });

  it('follows the column overrides', async () => {
    await database.query(
      `CREATE TABLE plain.sessions (token_id uuid PRIMARY KEY, invalidated_at timestamptz,
         valid_until timestamp without time zone NOT NULL)`,
    );
    const shape = await describe_({
      REFRESH_TOKENS_TABLE: 'plain.sessions',
      REFRESH_TOKENS_ID_COLUMN: 'token_id',
      REFRESH_TOKENS_REVOKED_COLUMN: 'invalidated_at',
      REFRESH_TOKENS_EXPIRES_AT_COLUMN: 'valid_until',
      NAIVE_TIMESTAMPS_TIMEZONE: 'UTC',
    });
    expect(shape.id).to.deep.equal({ column: 'token_id', type: 'uuid' });
    expect(markerOf(shape)).to.deep.equal({ column: 'invalidated_at', kind: 'time' });
    expect(shape.expiry).to.deep.include({
      kind: 'column',
      time: {
        column: 'valid_until',
        type: 'timestamp without time zone',
        reading: { kind: 'naive', zone: 'UTC' },
      },
    });
  });

  it('names every missing column and the variable that fixes it', async () => {
    await database.query('CREATE TABLE plain.bare (other integer)');
    const problems = await schemaProblems({ REFRESH_TOKENS_TABLE: 'plain.bare' });
    expect(problems).to.have.length(3);
    expect(problems[0]).to.match(
      /plain\.bare has no column "revoked", "revoked_at", .*\. Set REFRESH_TOKENS_REVOKED_COLUMN/,
    );
    expect(problems[1]).to.match(
      /plain\.bare has no column "expires_at", "expiresAt", "expires"\. Set REFRESH_TOKENS_EXPIRES_AT_COLUMN/,
    );
    expect(problems[2]).to.match(
      /plain\.bare has no "id" column and no single-column primary key.* Set REFRESH_TOKENS_ID_COLUMN/,
    );
  });

  it('refuses to guess between a revoked boolean and a revoked_at timestamp', async () => {
    await database.query(
      `CREATE TABLE plain.both (id uuid, revoked boolean, revoked_at timestamptz, expires_at timestamptz)`,
    );
    const problems = await schemaProblems({ REFRESH_TOKENS_TABLE: 'plain.both' });
    expect(problems[0]).to.match(
      /has both "revoked" and "revoked_at"\. Set REFRESH_TOKENS_REVOKED_COLUMN/,
    );
  });

  it('refuses columns of a type it cannot compare', async () => {
    await database.query(`CREATE TABLE plain.texty (id uuid, revoked text, expires_at date)`);
    const problems = await schemaProblems({ REFRESH_TOKENS_TABLE: 'plain.texty' });
    expect(problems).to.have.length(2);
    expect(problems[0]).to.match(
      /plain\.texty\.revoked is text; a marker is a boolean or a timestamp/,
    );
    expect(problems[1]).to.match(/plain\.texty\.expires_at is date, not a time/);
  });

  it('refuses a view', async () => {
    await database.query('CREATE VIEW plain.token_view AS SELECT * FROM plain.refresh_tokens');
    const problems = await schemaProblems({ REFRESH_TOKENS_TABLE: 'plain.token_view' });
    expect(problems[0]).to.match(/plain\.token_view is not a table \(pg_class\.relkind 'v'\)/);
  });

  it('lists the leaves of a partitioned table', async () => {
    await database.query(
      `CREATE TABLE plain.parted (id uuid, revoked boolean, expires_at timestamptz NOT NULL)
       PARTITION BY RANGE (expires_at)`,
    );
    await database.query(
      `CREATE TABLE plain.parted_old PARTITION OF plain.parted FOR VALUES FROM (MINVALUE) TO ('2000-01-01')`,
    );
    await database.query(`CREATE TABLE plain.parted_rest PARTITION OF plain.parted DEFAULT`);
    const shape = await describe_({ REFRESH_TOKENS_TABLE: 'plain.parted' });
    expect(shape.partitioned).to.equal(true);
    expect(shape.leaves).to.deep.equal([
      { schema: 'plain', name: 'parted_old' },
      { schema: 'plain', name: 'parted_rest' },
    ]);
  });
});
