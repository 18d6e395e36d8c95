// Roles for tests that run token-reaper as something other than the superuser. Roles are
// cluster-wide, so every role has a name of its own for this run, and each block drops its
// roles afterwards (with what they own or were granted, when a failure kept the block's
// database).
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { withServerClient, type TestDatabaseHandle } from './database.js';

export const ROLE_PASSWORD = 'token-reaper-role-test';
/**
 * Call inside a `describe`, after useTestDatabase: returns a function that makes a role name
 * unique to this run. The block's `after` hook drops those roles.
 */
export function useRoles(database: TestDatabaseHandle) {
  const names: string[] = [];
  after('drop the roles', async () => {
    const existing = await withServerClient(async (client) => {
      const result = await client.query<{ rolname: string }>(
        'SELECT rolname FROM pg_roles WHERE rolname = ANY($1)',
        [names],
      );
      return result.rows.map((row) => pg.escapeIdentifier(row.rolname));
    });
    if (existing.length === 0) return;
    const roles = existing.join(', ');
    let kept: string | null = null;
    try {
      kept = database.url;
    } catch {
      // The database was never created.
    }
    // A database kept after a failure still holds the roles' objects and grants.
    if (kept !== null) {
      await withServerClient(async (client) => {
        const found = await client.query('SELECT 1 FROM pg_database WHERE datname = $1', [
          database.name,
        ]);
        if (found.rowCount === 0) return;
        await withServerClient(async (inDatabase) => {
          await inDatabase.query(`REASSIGN OWNED BY ${roles} TO CURRENT_USER`);
          await inDatabase.query(`DROP OWNED BY ${roles}`);
        }, kept);
      });
    }
    await withServerClient((client) => client.query(`DROP ROLE IF EXISTS ${roles}`));
  });
  return (label: string) => {
    const name = `token_reaper_test_${label}_${randomBytes(4).toString('hex')}`;
    names.push(name);
    return name;
  };
}

/** The database URL with the role and its password in place of the superuser. */
export function urlAs(url: string, role: string) {
  const parsed = new URL(url);
  parsed.username = role;
  parsed.password = ROLE_PASSWORD;
  return parsed.toString();
}

export async function giveLogin(database: TestDatabaseHandle, role: string) {
  await database.query(`ALTER ROLE ${pg.escapeIdentifier(role)} LOGIN PASSWORD '${ROLE_PASSWORD}'`);
}
