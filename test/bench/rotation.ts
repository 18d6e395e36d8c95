// The auth service's refresh-token rotation, flat out: what a purge source costs the commits
// that revoke. Each client is one connection, a user's chain of refresh tokens, and loops as
// fast as the server lets it over one transaction:
//
//   BEGIN; UPDATE … SET revoked = true WHERE id = $old; INSERT … (the successor); COMMIT
//
// with the server's own synchronous_commit and fsync, as the auth service commits. The old
// token is the one the client issued last, so every rotation revokes a live token, as a real
// refresh does. Unlike workload.ts, this is closed-loop: the figure is the throughput the server
// reaches, and the latency of each transaction (BEGIN to COMMIT's reply, client side) at that
// throughput. A NOTIFY takes a database-wide lock at commit, held through the WAL flush; this is
// where that lock shows.
import { randomUUID } from 'node:crypto';

import pg from 'pg';

import { maximum, percentile } from './statistics.js';
import { WORKLOAD_HASH_PREFIX } from './workload.js';

/** Unmeasured rotations per client first: prepared statements, catalog caches. */
const WARM_UP_ROTATIONS = 20;
const STATEMENT_TIMEOUT_MS = 30_000;

export interface RotationOptions {
  readonly url: string;
  /** Quoted table name. */
  readonly table: string;
  readonly clients: number;
  readonly durationMs: number;
}

export interface RotationResult {
  readonly clients: number;
  readonly seconds: number;
  /** Rotations committed within the measured window. */
  readonly rotations: number;
  readonly failed: number;
  readonly rotationsPerSecond: number;
  readonly p50Ms: number | null;
  readonly p99Ms: number | null;
  readonly maxMs: number | null;
}

export async function runRotations(options: RotationOptions): Promise<RotationResult> {
  const clients = await Promise.all(
    Array.from({ length: options.clients }, async () => {
      const client = new pg.Client({
        connectionString: options.url,
        application_name: 'token-reaper-bench-rotation',
        statement_timeout: STATEMENT_TIMEOUT_MS,
      });
      client.on('error', () => undefined);
      await client.connect();
      return client;
    }),
  );
  try {
    // Each client's user and first token, then the warm-up, all before the clock starts.
    const chains = await Promise.all(
      clients.map(async (client) => {
        const userId = randomUUID();
        let current = await issue(client, options.table, userId);
        for (let index = 0; index < WARM_UP_ROTATIONS; index += 1) {
          current = await rotate(client, options.table, userId, current);
        }
        return { client, userId, current };
      }),
    );

    const latencies: number[] = [];
    let failed = 0;
    const from = performance.now();
    const to = from + options.durationMs;
    await Promise.all(
      chains.map(async (chain) => {
        while (performance.now() < to) {
          const started = performance.now();
          try {
            chain.current = await rotate(chain.client, options.table, chain.userId, chain.current);
          } catch {
            failed += 1;
            continue;
          }
          const ended = performance.now();
          // A rotation that commits after the window closed is not counted: the window is
          // the same for every condition.
          if (ended <= to) latencies.push(ended - started);
        }
      }),
    );
    const seconds = options.durationMs / 1000;
    return {
      clients: options.clients,
      seconds,
      rotations: latencies.length,
      failed,
      rotationsPerSecond: latencies.length / seconds,
      p50Ms: percentile(latencies, 0.5),
      p99Ms: percentile(latencies, 0.99),
      maxMs: maximum(latencies),
    };
  } finally {
    await Promise.all(clients.map((client) => client.end().catch(() => undefined)));
  }
}

/** Revokes `old` and issues its successor in one transaction; resolves with the successor. */
async function rotate(client: pg.Client, table: string, userId: string, old: string) {
  await client.query('BEGIN');
  try {
    await client.query({
      name: 'bench-rotation-revoke',
      text: `UPDATE ${table} SET revoked = true WHERE id = $1`,
      values: [old],
    });
    const successor = await issue(client, table, userId);
    await client.query('COMMIT');
    return successor;
  } catch (error) {
    await client.query('ROLLBACK').catch(() => undefined);
    throw error;
  }
}

async function issue(client: pg.Client, table: string, userId: string): Promise<string> {
  const result = await client.query<{ id: string }>({
    name: 'bench-rotation-issue',
    text: `INSERT INTO ${table} (user_id, token_hash, expires_at)
           VALUES ($1, $2, now() + interval '30 days') RETURNING id`,
    values: [userId, `${WORKLOAD_HASH_PREFIX}${randomUUID()}`],
  });
  return result.rows[0]!.id;
}
