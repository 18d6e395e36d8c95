// The purge sources (PURGE_SOURCE) compared: what each costs the auth service's revoking
// commits, and how soon each deletes a revoked token.
//
// Conditions, each on its own copy of one template, in alternating rounds (none, notify, wal,
// poll, none, …) so a slow patch of the machine hits them all:
// - none: no trigger, no publication, no slot, no daemon: the auth service alone. The indexes
//   `install` makes (expiry, partial on revoked rows) stay, because every source has them and
//   the sweep needs them: what is compared is the purge source, not token-reaper as a whole;
// - notify, wal, poll: `token-reaper install` and `token-reaper start` with that PURGE_SOURCE,
//   the daemon purging (daemon.ts) before the clock starts.
// In each, rotation.ts runs the auth service's rotations flat out for a fixed time. Throughput
// and p99 are then compared as ratios to none's medians from the same run.
//
// Then, per source, purge-latency.ts measures revocation commit → row gone at the steady rates,
// on a fresh copy with that source installed; the rate the revoking clients reached is part
// of the result (with notify, every NOTIFYing commit queues for one lock).
//
// The template is a copy of the plain one with its revoked rows deleted (a running daemon keeps
// none; the first catch-up is not what is measured) and token-reaper's schema dropped, which
// takes the notify trigger with it. `wal` needs wal_level=logical and a bounded
// max_slot_wal_keep_size: the embedded server has both; on a TEST_DATABASE_URL without them, wal
// is reported as skipped, with the reason.
import pg from 'pg';

import { waitFor, type ProcessHandle } from '../support/cli.js';
import { quoteTable } from '../support/fixtures.js';

import { openCpuWindow, type CpuUse } from './cpu.js';
import {
  daemonEnvironment,
  expectedObjects,
  install,
  PURGE_SOURCES,
  readPurgeObjects,
  sourceEnvironment,
  startDaemon,
  stopDaemon,
  type CompiledDaemon,
  type PurgeObjects,
  type PurgeSource,
} from './daemon.js';
import type { BenchServer } from './databases.js';
import {
  DELETE_EVENTS,
  measurePurgeLatency,
  type PurgePhase,
  type PurgeResult,
} from './purge-latency.js';
import { runRotations, type RotationResult } from './rotation.js';
import { checkpoint } from './scenarios.js';
import { medianOf, ratio } from './statistics.js';
import type { Template } from './templates.js';

export type Condition = 'none' | PurgeSource;
export const CONDITIONS: readonly Condition[] = ['none', ...PURGE_SOURCES];

/** PURGE_POLL_INTERVAL_MS's default in src/config.ts, for the goal when --daemon-env sets none. */
const DEFAULT_POLL_INTERVAL_MS = 100;
/** Bounds the wait for a daemon to delete what the rotations revoked. */
const DRAIN_TIMEOUT_MS = 120_000;

export interface SourcesOptions {
  readonly rounds: number;
  readonly rotationSeconds: number;
  readonly rotationClients: number;
  /** The steady revocation rates of the revoke → gone measurement. */
  readonly phases: readonly PurgePhase[];
  /** Extra variables for every daemon (--daemon-env), e.g. PURGE_POLL_INTERVAL_MS. */
  readonly daemonEnvironment: Readonly<Record<string, string>>;
  readonly build: CompiledDaemon;
  readonly progress: (message: string) => void;
}

export interface ConditionRound {
  readonly round: number;
  readonly rotation: RotationResult;
  /** What was in place while the rotations ran, and whether the condition wants exactly that. */
  readonly objects: PurgeObjects;
  readonly objectsAsExpected: boolean;
  /** After the rotations stopped, until no revoked row was left; null for none. */
  readonly drainMs: number | null;
  /** Revoked rows still there when the drain wait ended: should be 0 (none: not counted). */
  readonly revokedLeft: number | null;
  /** The daemon's deleting rounds during the rotations (DELETE_EVENTS). */
  readonly daemonBatches: number | null;
  /** token-reaper's CPU during the rotations (cpu.ts); null for none. */
  readonly cpu: CpuUse | null;
  /** The daemon's last log lines when it left revoked rows behind, to see why. */
  readonly daemonOutput: string | null;
  readonly daemonExitCode: number | null;
}

export interface ConditionSummary {
  readonly condition: Condition;
  /** Why the condition was not measured, or null. */
  readonly skipped: string | null;
  readonly rounds: readonly ConditionRound[];
  readonly errors: readonly string[];
  readonly median: {
    readonly rotationsPerSecond: number | null;
    readonly p50Ms: number | null;
    readonly p99Ms: number | null;
    readonly drainMs: number | null;
    /** CPU seconds per second of rotations: the share of one core token-reaper took. */
    readonly daemonCpuShare: number | null;
    readonly sessionsCpuShare: number | null;
  };
  /** This condition's median over none's, from the same run. */
  readonly toNone: { readonly throughput: number | null; readonly p99: number | null };
}

export interface SourceLatency {
  readonly source: PurgeSource;
  readonly skipped: string | null;
  readonly error: string | null;
  readonly result: PurgeResult | null;
}

export interface SourcesResult {
  readonly rounds: number;
  readonly rotationSeconds: number;
  readonly rotationClients: number;
  readonly pollIntervalMs: number;
  readonly conditions: readonly ConditionSummary[];
  readonly latency: readonly SourceLatency[];
}

export async function measureSources(
  server: BenchServer,
  plain: Template,
  options: SourcesOptions,
): Promise<SourcesResult> {
  const walSkipped = await walUnavailable(server);
  const skipped = (condition: Condition) => (condition === 'wal' ? walSkipped : null);
  if (walSkipped !== null) options.progress(`sources: wal skipped: ${walSkipped}`);
  options.progress('sources: the template without purge objects');
  const template = await buildSourcesTemplate(server, plain);

  const rounds = new Map(CONDITIONS.map((condition) => [condition, [] as ConditionRound[]]));
  const errors = new Map(CONDITIONS.map((condition) => [condition, [] as string[]]));
  for (let round = 1; round <= options.rounds; round += 1) {
    for (const condition of CONDITIONS) {
      if (skipped(condition) !== null) continue;
      options.progress(`sources: round ${round}/${options.rounds}: ${condition}`);
      try {
        const result = await runCondition(server, template, condition, round, options);
        rounds.get(condition)!.push(result);
        options.progress(
          `  ${Math.round(result.rotation.rotationsPerSecond).toLocaleString('en-US')} rotations/s, ` +
            `p50 ${result.rotation.p50Ms?.toFixed(1)} ms, p99 ${result.rotation.p99Ms?.toFixed(1)} ms` +
            (result.drainMs === null ? '' : `, drained ${Math.round(result.drainMs)} ms after`) +
            (result.objectsAsExpected
              ? ''
              : `, objects NOT as expected: ${JSON.stringify(result.objects)}`),
        );
      } catch (error) {
        const message = error instanceof Error ? error.message : String(error);
        errors.get(condition)!.push(message);
        options.progress(`  failed: ${message.split('\n')[0]}`);
      }
    }
  }
  const summaries = CONDITIONS.map((condition) =>
    summarize(condition, skipped(condition), rounds.get(condition)!, errors.get(condition)!),
  );
  const none = summaries.find((summary) => summary.condition === 'none')!.median;
  const conditions = summaries.map((summary) => ({
    ...summary,
    toNone: {
      throughput: ratio(summary.median.rotationsPerSecond, none.rotationsPerSecond),
      p99: ratio(summary.median.p99Ms, none.p99Ms),
    },
  }));

  const latency: SourceLatency[] = [];
  for (const source of PURGE_SOURCES) {
    if (skipped(source) !== null) {
      latency.push({ source, skipped: skipped(source), error: null, result: null });
      continue;
    }
    try {
      const result = await measurePurgeLatency(server, template, {
        phases: options.phases,
        burstRevocations: 0,
        daemonEnvironment: options.daemonEnvironment,
        build: options.build,
        source,
        label: `sources ${source}`,
        progress: options.progress,
      });
      latency.push({ source, skipped: null, error: null, result });
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      options.progress(`  failed: ${message.split('\n')[0]}`);
      latency.push({ source, skipped: null, error: message, result: null });
    }
  }
  return {
    rounds: options.rounds,
    rotationSeconds: options.rotationSeconds,
    rotationClients: options.rotationClients,
    pollIntervalMs: Number(
      options.daemonEnvironment['PURGE_POLL_INTERVAL_MS'] ?? DEFAULT_POLL_INTERVAL_MS,
    ),
    conditions,
    latency,
  };
}

/** Why this server cannot run `wal`, or null when it can. */
async function walUnavailable(server: BenchServer): Promise<string | null> {
  const settings = await server.withClient(async (client) => {
    const result = await client.query<{ wal_level: string; keep: string }>(
      `SELECT current_setting('wal_level') AS wal_level,
              current_setting('max_slot_wal_keep_size') AS keep`,
    );
    return result.rows[0]!;
  });
  if (settings.wal_level !== 'logical') {
    return `wal_level is ${settings.wal_level} on ${server.description.source}, and logical decoding needs logical (the embedded server has it)`;
  }
  if (settings.keep === '-1') {
    return `max_slot_wal_keep_size is -1 on ${server.description.source}: install refuses a slot that may keep WAL without bound`;
  }
  return null;
}

/** A copy of plain with no revoked rows and no token-reaper schema (so no trigger). */
async function buildSourcesTemplate(server: BenchServer, plain: Template): Promise<Template> {
  const database = await server.createDatabase('template_sources', plain.database);
  const table = quoteTable(plain.table);
  await database.query(`DELETE FROM ${table} WHERE revoked`);
  await database.query('DROP SCHEMA token_reaper CASCADE');
  await database.query(`VACUUM (FREEZE, ANALYZE) ${table}`);
  const objects = await readPurgeObjects(database, table);
  if (objects.trigger || objects.publication || objects.slot) {
    throw new Error(`the sources template still has purge objects: ${JSON.stringify(objects)}`);
  }
  await server.freezeTemplate(database);
  return { ...plain, database };
}

async function runCondition(
  server: BenchServer,
  template: Template,
  condition: Condition,
  round: number,
  options: SourcesOptions,
): Promise<ConditionRound> {
  const database = await server.createDatabase(`sources_${condition}_${round}`, template.database);
  const table = quoteTable(template.table);
  let daemon: ProcessHandle | undefined;
  try {
    if (condition !== 'none') {
      const environment = daemonEnvironment(database, template.table, {
        ...sourceEnvironment(condition),
        ...options.daemonEnvironment,
      });
      await install(options.build, environment);
      daemon = await startDaemon(options.build, database, table, environment);
    }
    const objects = await readPurgeObjects(database, table);
    const expected = expectedObjects(condition);
    const firstLog = daemon?.logs.length ?? 0;
    await checkpoint(server);

    const cpuWindow =
      daemon === undefined
        ? null
        : await openCpuWindow(database, daemon.child.pid, serverIsLocal(server));
    const rotation = await runRotations({
      url: database.url,
      table,
      clients: options.rotationClients,
      durationMs: options.rotationSeconds * 1000,
    });
    const cpu = (await cpuWindow?.finish()) ?? null;

    let drainMs: number | null = null;
    let revokedLeft: number | null = null;
    let daemonExitCode: number | null = null;
    let daemonOutput: string | null = null;
    if (daemon !== undefined) {
      ({ drainMs, revokedLeft } = await drain(database.url, table));
      if (revokedLeft > 0) daemonOutput = daemon.describeOutput();
      daemonExitCode = await stopDaemon(daemon);
    }
    return {
      round,
      rotation,
      objects,
      objectsAsExpected:
        objects.trigger === expected.trigger &&
        objects.publication === expected.publication &&
        objects.slot === expected.slot,
      drainMs,
      revokedLeft,
      daemonBatches:
        daemon === undefined
          ? null
          : daemon.logs.slice(firstLog).filter((line) => DELETE_EVENTS.has(line.event)).length,
      daemonExitCode,
      cpu,
      daemonOutput,
    };
  } finally {
    await daemon?.kill();
    await database.drop();
  }
}

/** Whether the server runs on this machine, so that /proc shows its processes. */
function serverIsLocal(server: BenchServer): boolean {
  return ['127.0.0.1', 'localhost', '[::1]'].includes(new URL(server.url).hostname);
}

/** How long after the rotations stopped the daemon needed to delete every revoked row. */
async function drain(url: string, table: string) {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined);
  await client.connect();
  const started = performance.now();
  const revoked = async () =>
    (
      await client.query<{ count: number }>(
        `SELECT count(*)::int AS count FROM ${table} WHERE revoked`,
      )
    ).rows[0]!.count;
  try {
    await waitFor(async () => (await revoked()) === 0, {
      timeoutMs: DRAIN_TIMEOUT_MS,
      intervalMs: 10,
      message: 'the daemon to delete the revoked tokens',
    });
    return { drainMs: performance.now() - started, revokedLeft: 0 };
  } catch {
    return { drainMs: null, revokedLeft: await revoked() };
  } finally {
    await client.end().catch(() => undefined);
  }
}

function summarize(
  condition: Condition,
  skipped: string | null,
  rounds: readonly ConditionRound[],
  errors: readonly string[],
): Omit<ConditionSummary, 'toNone'> {
  return {
    condition,
    skipped,
    rounds,
    errors,
    median: {
      rotationsPerSecond: medianOf(rounds.map((round) => round.rotation.rotationsPerSecond)),
      p50Ms: medianOf(rounds.map((round) => round.rotation.p50Ms)),
      p99Ms: medianOf(rounds.map((round) => round.rotation.p99Ms)),
      drainMs: medianOf(rounds.map((round) => round.drainMs)),
      daemonCpuShare: medianOf(
        rounds.map((round) => ratio(round.cpu?.daemonSeconds ?? null, round.rotation.seconds)),
      ),
      sessionsCpuShare: medianOf(
        rounds.map((round) => ratio(round.cpu?.sessionsSeconds ?? null, round.rotation.seconds)),
      ),
    },
  };
}
