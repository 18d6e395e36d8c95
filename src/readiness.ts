// What /readyz reports beyond the listener and the last sweep: whether the daemon could do its
// work if a revocation came now. A listener that holds LISTEN proves nothing about that: the
// trigger may have been dropped (then nothing notifies, and nothing is logged), the role may
// have lost DELETE, or the database may have turned read-only. These are checked at start
// and every READINESS_CHECK_INTERVAL, by asking PostgreSQL itself:
//
//   DELETE FROM <table> WHERE false
//
// deletes nothing, yet PostgreSQL checks the DELETE right and a read-only transaction when
// the statement starts, whatever it would match. It takes the same lock as any delete, so it
// runs with a short lock_timeout and a wait for a lock counts as no answer, not as a problem.
import { sql, type DatabasePool } from 'slonik';
import type { Config } from './config.js';
import { StandbyError } from './errors.js';
import { serializeError } from './logger.js';
import {
  describeTargets,
  qualifiedName,
  recordsRevocationTimes,
  relationIdentifier,
  type TableShape,
} from './schema.js';
import type { TargetRule } from './targets/rule.js';

export type UnreadyReason =
  | 'listener_disconnected'
  | 'database_standby'
  | 'last_sweep_failed'
  | 'purge_failing'
  | 'trigger_missing'
  | 'delete_denied'
  | 'database_read_only'
  | 'check_failed';

export interface ReadinessProblem {
  reason: UnreadyReason;
  /** The table concerned, or null for the database as a whole. */
  table: string | null;
  message: string;
}

const CHECK_LOCK_TIMEOUT_MS = 1_000;
const INSUFFICIENT_PRIVILEGE = '42501';
const READ_ONLY_SQL_TRANSACTION = '25006';
const LOCK_NOT_AVAILABLE = '55P03';

/** Every problem that keeps the daemon from deleting now; empty when it can. */
export async function checkReadiness(
  pool: DatabasePool,
  rules: readonly TargetRule[],
  config: Pick<Config, 'naiveTimestampsTimezone' | 'purge'>,
): Promise<ReadinessProblem[]> {
  let shapes: TableShape[];
  try {
    shapes = await describeTargets(pool, { ...config, targets: rules });
  } catch (error) {
    return [
      error instanceof StandbyError
        ? { reason: 'database_standby', table: null, message: error.message }
        : { reason: 'check_failed', table: null, message: serializeError(error).message },
    ];
  }
  const problems: ReadinessProblem[] = [];
  for (const shape of shapes) {
    const table = qualifiedName(shape.relation);
    // Only `notify` needs the trigger; `wal` and `poll` need none.
    if (config.purge.source === 'notify' && shape.notify && !shape.revokeTriggerInstalled) {
      problems.push({
        reason: 'trigger_missing',
        table,
        message: `${table} has no revoke trigger, so revoked tokens wait for the sweep. Run "token-reaper install" to add it.`,
      });
    }
    const problem = await checkDelete(pool, shape);
    if (problem !== null) problems.push({ ...problem, table });
  }
  return problems;
}

async function checkDelete(
  pool: DatabasePool,
  shape: TableShape,
): Promise<Omit<ReadinessProblem, 'table'> | null> {
  try {
    await pool.transaction(async (transaction) => {
      await transaction.query(
        sql.unsafe`SELECT set_config('lock_timeout', ${String(CHECK_LOCK_TIMEOUT_MS)}, true)`,
      );
      await transaction.query(
        sql.unsafe`DELETE FROM ${relationIdentifier(shape.relation)} WHERE false`,
      );
      // With a grace on a boolean column, the daemon also writes its revocation times.
      if (recordsRevocationTimes(shape)) {
        await transaction.query(sql.unsafe`DELETE FROM token_reaper.revocations WHERE false`);
        await transaction.query(
          sql.unsafe`INSERT INTO token_reaper.revocations SELECT * FROM token_reaper.revocations WHERE false`,
        );
      }
    });
    return null;
  } catch (error) {
    const { code, message } = serializeError(error);
    if (code === LOCK_NOT_AVAILABLE) return null;
    if (code === INSUFFICIENT_PRIVILEGE) return { reason: 'delete_denied', message };
    if (code === READ_ONLY_SQL_TRANSACTION) return { reason: 'database_read_only', message };
    return { reason: 'check_failed', message };
  }
}
