// Where an unfinished walk stopped, kept in token_reaper.sweep_positions, so that the next
// sweep resumes there instead of reading again from page 0 what was just cleaned. A first
// sweep of a table that was never cleaned may need several SWEEP_MAX_DURATION windows, and
// a daemon restarted in the middle of a long walk loses at most CHECKPOINT_INTERVAL_MS of it.
//
// One row per relation walked (the table, or each leaf of a partitioned one) says how far the
// walk of the current round got: the pages below next_page are done. A leaf walked to its end
// keeps its row, with next_page at its size then, until the whole table is done; then the
// table's rows are deleted and the next sweep starts a new round from page 0. Pages added at
// the end since are walked when the round resumes.
//
// A position is only good for the file it was taken in: VACUUM FULL, CLUSTER, a rewriting
// ALTER TABLE or TRUNCATE give the relation a new relfilenode and move every row, so a
// position with another filenode is ignored and that relation starts from 0.
//
// Positions are an optimisation, never a condition of correctness: every batch re-checks the
// dead rule, so a lost position only re-reads pages. A database where install has not made
// the table yet (an upgrade without `install`), or a role made before it, sweeps from 0 every
// time, after one warning.
import { sql, type DatabasePool, type QuerySqlToken } from 'slonik';
import { z } from 'zod';
import { serializeError } from '../logger.js';
import { qualifiedName, type Relation, type TableShape } from '../schema.js';

export const POSITIONS: Relation = { schema: 'token_reaper', name: 'sweep_positions' };
/** How often a long walk saves how far it got, for a restart in its middle. */
export const CHECKPOINT_INTERVAL_MS = 30_000;

/** The errors that mean the positions cannot be used, not that the database is in trouble. */
const UNAVAILABLE: Record<string, string> = {
  '42P01': 'does not exist (run `token-reaper install`)',
  '42501': 'may not be read by this role (run `token-reaper install --role` again)',
};

const positionRow = z.object({ relation: z.string(), filenode: z.number(), nextPage: z.number() });

export interface WalkPosition {
  /** The first page not walked yet in this round. */
  nextPage: number;
  /** pg_relation_filenode at the time: a rewritten relation starts from 0. */
  filenode: number;
}

export interface SweepPositions {
  /** Where the round stands for `relation`, or null to start from page 0. */
  startOf(relation: Relation, filenode: number): WalkPosition | null;
  save(relation: Relation, position: WalkPosition): Promise<void>;
  /** The table's round is complete: its next sweep starts from 0. */
  complete(): Promise<void>;
}

/**
 * The positions of `shape`'s round, or null when they cannot be read: the walk then starts
 * from 0. A missing table, a role without the right to it, or a failed save is reported to
 * `onUnavailable` with the reason, and never fails the sweep; after a failed save the walk
 * saves nothing more.
 */
export async function readPositions(
  pool: DatabasePool,
  shape: TableShape,
  onUnavailable: (reason: string, error: unknown) => void,
): Promise<SweepPositions | null> {
  const target = qualifiedName(shape.relation);
  let rows: readonly z.infer<typeof positionRow>[];
  try {
    rows = await pool.any(sql.type(positionRow)`
      SELECT relation, filenode::int8::float8 AS filenode, next_page AS "nextPage"
      FROM token_reaper.sweep_positions WHERE target = ${target}
    `);
  } catch (error) {
    const reason = UNAVAILABLE[serializeError(error).code ?? ''];
    if (reason === undefined) throw error;
    onUnavailable(reason, error);
    return null;
  }
  const positions = new Map(rows.map((row) => [row.relation, row]));
  let saved = false;
  let failed = false;
  const write = async (statement: QuerySqlToken) => {
    if (failed) return;
    try {
      await pool.query(statement);
    } catch (error) {
      failed = true;
      onUnavailable('could not be written', error);
    }
  };
  return {
    startOf(relation, filenode) {
      const position = positions.get(qualifiedName(relation));
      return position && position.filenode === filenode ? position : null;
    },
    async save(relation, position) {
      await write(sql.unsafe`
        INSERT INTO token_reaper.sweep_positions (target, relation, filenode, next_page)
        VALUES (${target}, ${qualifiedName(relation)}, ${position.filenode}, ${position.nextPage})
        ON CONFLICT (target, relation) DO UPDATE
        SET filenode = excluded.filenode, next_page = excluded.next_page, saved_at = now()
      `);
      saved = true;
    },
    async complete() {
      if (positions.size === 0 && !saved) return;
      await write(sql.unsafe`DELETE FROM token_reaper.sweep_positions WHERE target = ${target}`);
    },
  };
}
