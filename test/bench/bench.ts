// `npm run bench [-- options]`: how fast token-reaper deletes, and what it costs the auth
// service, measured against the alternatives on one PostgreSQL in one run. See --help, and
// "How to delete fast without hurting the auth service" in DESIGN.md for the figures it checks.
//
// Progress goes to stderr; stdout carries only the result (markdown, or JSON with --json), so
// `npm run bench -- --json > results.json` works.
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, relative, resolve } from 'node:path';
import { parseArgs } from 'node:util';

import { killChildProcesses, repositoryRoot } from '../support/cli.js';

import { compileDaemon, type CompiledDaemon } from './daemon.js';
import { describeMachine, provisionServer, type BenchServer } from './databases.js';
import {
  collectGentleProblems,
  judgeGentleGoals,
  measureGentle,
  PAUSE_RATIOS,
  QUICK_PAUSE_RATIOS,
  type GentleResult,
} from './gentle.js';
import { measurePurgeLatency, type PurgeResult } from './purge-latency.js';
import {
  judgeGoals,
  renderMarkdown,
  summarizeScenario,
  type BenchResults,
  type ScenarioSummary,
} from './report.js';
import { runScenario, SCENARIOS, type ScenarioId, type ScenarioRun } from './scenarios.js';
import { measureSources, type SourcesResult } from './sources.js';
import {
  buildTemplates,
  DEFAULT_REVOKED_UNEXPIRED_SHARE,
  type Template,
  type Templates,
} from './templates.js';

type Part = ScenarioId | 'purge' | 'sources' | 'gentle';
const PARTS: readonly Part[] = [
  ...SCENARIOS.map((scenario) => scenario.id),
  'purge',
  'sources',
  'gentle',
];

const USAGE = `npm run bench -- [options]

Measures, on TEST_DATABASE_URL (a superuser URL; databases are created and dropped there) or
else on an embedded PostgreSQL started for the run:
  sweep contenders: (a) one DELETE, (b) LIMIT batches, (c) token-reaper sweep, (c2) with
  SWEEP_CONCURRENCY=2, (d) the sweep on daily partitions; each with an auth-like workload
  beside it; then the daemon's purge latency and peak RSS; then the purge sources
  (PURGE_SOURCE none/notify/wal/poll): what each costs the auth service's rotations, and
  revocation → row gone for each; then gentle: on the table with a fifth index (user_id),
  the workload's p99 during one DELETE and sweeps at the defaults and at each
  SWEEP_PAUSE_RATIO, each sweep's batch durations, and, on a throwaway primary with a
  streaming standby (the machine's server binaries; skipped without them), the standby's
  replay lag during a sweep without and with SWEEP_MAX_REPLICA_LAG=1s.

Options:
  --rows N              rows in the table (default 2000000; --quick 20000), 52% of them dead
  --revoked-unexpired P percent of the rows revoked but not expired, the rest of the dead
                        expired (default 0.2: the purge deletes revoked tokens at once)
  --runs N              alternating runs of each contender (default 3; --quick 1)
  --purge-seconds N     seconds of each steady revocation rate (default 20; --quick 2, and 1
                        for each purge source)
  --burst N             revocations in the one-UPDATE burst (default 100000; --quick 5000)
  --at-rest-seconds N   the workload alone before each contender (default 8; --quick 1)
  --workload-rate N     workload operations per second, all clients together (default 400)
  --workload-clients N  workload connections (default 4)
  --rotation-seconds N  seconds of rotations per condition and round (default 15; --quick 2)
  --rotation-clients N  rotating connections (default 16)
  --only LIST           comma-separated: ${PARTS.join(', ')}
  --pause-ratios LIST   gentle: the SWEEP_PAUSE_RATIOs to compare (default
                        ${PAUSE_RATIOS.join(',')}; --quick ${QUICK_PAUSE_RATIOS.join(',')})
  --gentle-variant K=V[,K=V…]
                        gentle: one more sweep condition with these variables (e.g.
                        SWEEP_BATCH_TARGET_MS=10,SWEEP_PAUSE_RATIO=3); repeatable
  --sweep-env K=V       an extra variable for every token-reaper sweep, to compare settings
                        (e.g. SWEEP_BATCH_PAGES=250); repeatable. (c2) keeps SWEEP_CONCURRENCY=2
  --daemon-env K=V      the same for the daemons of the purge and sources measurements
                        (e.g. PGOPTIONS='-c synchronous_commit=off', PURGE_POLL_INTERVAL_MS=50)
  --server-setting K=V  a setting for the embedded server, after its own (e.g. fsync=on
                        synchronous_commit=on, to commit as a production server does); repeatable
  --quick               small sizes, for CI: checks every scenario still runs
  --json                print the JSON to stdout instead of the markdown table
  --output PATH         where to write the JSON (default bench-results/bench-<timestamp>.json)
  --help

Exit code 1 only when a scenario crashes or a check finds a live row deleted or a dead row
left; missed goals are reported, not failed.`;

/** The steady revocation rates of the purge measurement, per second. */
const PURGE_RATES = [1_000, 5_000];

interface Options {
  rows: number;
  revokedUnexpiredShare: number;
  runs: number;
  purgeSeconds: number;
  burst: number;
  atRestSeconds: number;
  workloadRate: number;
  workloadClients: number;
  rotationSeconds: number;
  rotationClients: number;
  only: ReadonlySet<Part>;
  pauseRatios: readonly number[];
  gentleVariants: readonly Readonly<Record<string, string>>[];
  sweepEnvironment: Readonly<Record<string, string>>;
  daemonEnvironment: Readonly<Record<string, string>>;
  serverSettings: readonly string[];
  quick: boolean;
  json: boolean;
  output: string;
}

function parseOptions(argv: readonly string[]): Options | 'help' {
  const { values } = parseArgs({
    args: [...argv],
    options: {
      rows: { type: 'string' },
      'revoked-unexpired': { type: 'string' },
      runs: { type: 'string' },
      'purge-seconds': { type: 'string' },
      burst: { type: 'string' },
      'at-rest-seconds': { type: 'string' },
      'workload-rate': { type: 'string' },
      'workload-clients': { type: 'string' },
      'rotation-seconds': { type: 'string' },
      'rotation-clients': { type: 'string' },
      only: { type: 'string' },
      'pause-ratios': { type: 'string' },
      'gentle-variant': { type: 'string', multiple: true },
      'sweep-env': { type: 'string', multiple: true },
      'daemon-env': { type: 'string', multiple: true },
      'server-setting': { type: 'string', multiple: true },
      quick: { type: 'boolean' },
      json: { type: 'boolean' },
      output: { type: 'string' },
      help: { type: 'boolean' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) return 'help';
  const quick = values.quick === true;
  const whole = (flag: string, value: string | undefined, fallback: number, minimum: number) => {
    if (value === undefined) return fallback;
    const number = Number(value.replaceAll('_', ''));
    if (!Number.isInteger(number) || number < minimum) {
      throw new Error(`--${flag} must be a whole number ≥ ${minimum}, not ${value}`);
    }
    return number;
  };
  const only = new Set<Part>(
    values.only === undefined
      ? PARTS
      : values.only.split(',').map((name) => {
          const trimmed = name.trim();
          if (!(PARTS as readonly string[]).includes(trimmed)) {
            throw new Error(`--only: unknown part ${trimmed}; use ${PARTS.join(', ')}`);
          }
          return trimmed as Part;
        }),
  );
  const percentage = (flag: string, value: string | undefined, fallback: number) => {
    if (value === undefined) return fallback;
    const number = Number(value);
    if (!Number.isFinite(number) || number < 0 || number > 50) {
      throw new Error(`--${flag} must be a percentage from 0 to 50, not ${value}`);
    }
    return number / 100;
  };
  const environment = (flag: string, settings: readonly string[] = []) =>
    Object.fromEntries(
      settings.map((setting) => {
        const match = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(setting);
        if (!match) throw new Error(`--${flag} takes NAME=value, not ${setting}`);
        return [match[1]!, match[2]!];
      }),
    );
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  return {
    rows: whole('rows', values.rows, quick ? 20_000 : 2_000_000, 1_000),
    revokedUnexpiredShare: percentage(
      'revoked-unexpired',
      values['revoked-unexpired'],
      DEFAULT_REVOKED_UNEXPIRED_SHARE,
    ),
    runs: whole('runs', values.runs, quick ? 1 : 3, 1),
    purgeSeconds: whole('purge-seconds', values['purge-seconds'], quick ? 2 : 20, 1),
    burst: whole('burst', values.burst, quick ? 5_000 : 100_000, 0),
    atRestSeconds: whole('at-rest-seconds', values['at-rest-seconds'], quick ? 1 : 8, 1),
    workloadRate: whole('workload-rate', values['workload-rate'], 400, 1),
    workloadClients: whole('workload-clients', values['workload-clients'], 4, 1),
    rotationSeconds: whole('rotation-seconds', values['rotation-seconds'], quick ? 2 : 15, 1),
    rotationClients: whole('rotation-clients', values['rotation-clients'], 16, 1),
    only,
    pauseRatios:
      values['pause-ratios'] === undefined
        ? quick
          ? QUICK_PAUSE_RATIOS
          : PAUSE_RATIOS
        : values['pause-ratios'].split(',').map((value) => {
            const number = Number(value.trim());
            if (value.trim() === '' || !Number.isFinite(number) || number < 0) {
              throw new Error(`--pause-ratios takes decimals ≥ 0, not ${value}`);
            }
            return number;
          }),
    gentleVariants: (values['gentle-variant'] ?? []).map((variant) =>
      environment('gentle-variant', variant.split(',')),
    ),
    sweepEnvironment: environment('sweep-env', values['sweep-env']),
    daemonEnvironment: environment('daemon-env', values['daemon-env']),
    serverSettings: (values['server-setting'] ?? []).map((setting) => {
      if (!/^[a-z_.]+=.+$/.test(setting)) {
        throw new Error(`--server-setting takes name=value, not ${setting}`);
      }
      return setting;
    }),
    quick,
    json: values.json === true,
    output: resolve(values.output ?? join(repositoryRoot, 'bench-results', `bench-${stamp}.json`)),
  };
}

const started = performance.now();
function progress(message: string) {
  const seconds = ((performance.now() - started) / 1000).toFixed(1).padStart(6);
  process.stderr.write(`[${seconds} s] ${message}\n`);
}

async function main(): Promise<number> {
  let options: Options | 'help';
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`bench: ${(error as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  if (options === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const startedAt = new Date().toISOString();
  const loadAtStart = describeMachine().loadAverage;

  const server = await provisionServer(options.serverSettings);
  stopOnSignals(server);
  progress(`PostgreSQL ${server.description.version} from ${server.description.source}`);
  const summaries: ScenarioSummary[] = [];
  let purge: PurgeResult | null = null;
  let purgeError: string | null = null;
  let sources: SourcesResult | null = null;
  let sourcesError: string | null = null;
  let gentle: GentleResult | null = null;
  let gentleError: string | null = null;
  let templates: Templates | undefined;
  let build: Promise<CompiledDaemon> | undefined;
  const warnings: string[] = [];
  try {
    templates = await buildTemplates(
      server,
      options.rows,
      options.revokedUnexpiredShare,
      progress,
      options.only.has('partitioned-sweep'),
    );

    const selected = SCENARIOS.filter((scenario) => options.only.has(scenario.id));
    const runs = new Map<ScenarioId, ScenarioRun[]>(selected.map((scenario) => [scenario.id, []]));
    const errors = new Map<ScenarioId, string[]>(selected.map((scenario) => [scenario.id, []]));
    // Alternating (a, b, c, c2, d, a, b, …), so a slow patch of the machine hits them all.
    for (let run = 1; run <= options.runs; run += 1) {
      for (const scenario of selected) {
        progress(`run ${run}/${options.runs}: ${scenario.label}`);
        try {
          const result = await runScenario(server, templates, scenario, {
            run,
            sweepEnvironment: options.sweepEnvironment,
            workloadClients: options.workloadClients,
            workloadOperationsPerSecond: options.workloadRate,
            atRestMs: options.atRestSeconds * 1000,
          });
          runs.get(scenario.id)!.push(result);
          progress(
            `  ${result.rowsDeleted.toLocaleString('en-US')} rows in ${Math.round(result.wallMs)} ms, ` +
              `slowest transaction ${Math.round(result.slowestTransactionMs ?? 0)} ms, ` +
              `WAL ${(result.walBytes / 1e6).toFixed(1)} MB (server ${(result.wal.totalBytes / 1e6).toFixed(1)} MB), ` +
              `workload p99 ${result.workloadAtRest.p99Ms?.toFixed(1)} → ${result.workloadDuring.p99Ms?.toFixed(1)} ms`,
          );
        } catch (error) {
          const message = describeError(error);
          errors.get(scenario.id)!.push(message);
          progress(`  failed: ${message}`);
        }
      }
    }
    for (const scenario of selected) {
      summaries.push(
        summarizeScenario(
          scenario.id,
          scenario.label,
          runs.get(scenario.id)!,
          errors.get(scenario.id)!,
        ),
      );
    }

    // One build for every daemon of the run; when it fails, each part fails with its error.
    if (options.only.has('purge') || options.only.has('sources')) {
      progress('compiling token-reaper');
      build = compileDaemon();
      // Awaited (and its failure reported) by each part; this only keeps it from going unhandled.
      build.catch(() => undefined);
    }
    if (options.only.has('purge')) {
      try {
        purge = await measurePurgeLatency(server, templates.plain, {
          phases: PURGE_RATES.map((rate) => ({
            revocationsPerSecond: rate,
            seconds: options.purgeSeconds,
          })),
          burstRevocations: options.burst,
          daemonEnvironment: options.daemonEnvironment,
          build: await build!,
          source: null,
          label: 'purge',
          progress,
        });
      } catch (error) {
        purgeError = describeError(error);
        progress(`purge failed: ${purgeError}`);
      }
    }
    if (options.only.has('sources')) {
      try {
        sources = await measureSources(server, templates.plain, {
          rounds: options.runs,
          rotationSeconds: options.rotationSeconds,
          rotationClients: options.rotationClients,
          // Three sources, two rates each: --quick keeps each rate to 1 s, so CI stays short.
          phases: PURGE_RATES.map((rate) => ({
            revocationsPerSecond: rate,
            seconds: options.quick ? Math.min(1, options.purgeSeconds) : options.purgeSeconds,
          })),
          daemonEnvironment: options.daemonEnvironment,
          build: await build!,
          progress,
        });
      } catch (error) {
        sourcesError = describeError(error);
        progress(`sources failed: ${sourcesError}`);
      }
    }
    if (options.only.has('gentle')) {
      try {
        gentle = await measureGentle(server, templates, {
          rows: options.rows,
          revokedUnexpiredShare: options.revokedUnexpiredShare,
          runs: options.runs,
          pauseRatios: options.pauseRatios,
          variants: options.gentleVariants,
          sweepEnvironment: options.sweepEnvironment,
          workloadClients: options.workloadClients,
          workloadOperationsPerSecond: options.workloadRate,
          atRestMs: options.atRestSeconds * 1000,
          quick: options.quick,
          progress,
        });
      } catch (error) {
        gentleError = describeError(error);
        progress(`gentle failed: ${gentleError}`);
      }
    }
  } finally {
    await server.dispose();
    await build?.then((compiled) => compiled.dispose()).catch(() => undefined);
  }

  const machine = { ...describeMachine(), loadAverageAtStart: loadAtStart };
  if (machine.loadAverageAtStart > machine.cores / 2) {
    warnings.push(
      `the machine was busy before the run began (load average ${machine.loadAverageAtStart.toFixed(1)} on ${machine.cores} cores): other processes compete for the CPU, expect noisy figures`,
    );
  }
  // Every part's warnings, even after one part failed.
  const failed = [
    collectProblems(summaries, purge, purgeError, warnings),
    collectSourceProblems(sources, sourcesError, warnings),
    collectGentleProblems(gentle, gentleError, warnings),
  ].some(Boolean);
  const results: BenchResults = {
    startedAt,
    durationMs: Math.round(performance.now() - started),
    command: [
      'npm run bench',
      ...(process.argv.length > 2 ? ['--', ...process.argv.slice(2)] : []),
    ].join(' '),
    options: { ...options, only: [...options.only] },
    machine,
    server: server.description,
    data:
      templates === undefined
        ? null
        : {
            plain: withoutDatabase(templates.plain),
            partitioned:
              templates.partitioned === null ? null : withoutDatabase(templates.partitioned),
          },
    scenarios: summaries,
    purge,
    purgeError,
    sources,
    sourcesError,
    gentle,
    gentleError,
    goals: [...judgeGoals(summaries, purge, sources), ...judgeGentleGoals(gentle)],
    warnings,
    failed,
  };

  await mkdir(dirname(options.output), { recursive: true });
  await writeFile(options.output, `${JSON.stringify(results, null, 2)}\n`);
  const shownPath = relative(process.cwd(), options.output) || options.output;
  if (options.json) {
    process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
    process.stderr.write(`JSON: ${shownPath}\n`);
  } else {
    process.stdout.write(renderMarkdown(results, shownPath));
  }
  progress(failed ? 'done, with failures (see Warnings)' : 'done');
  return failed ? 1 : 0;
}

/**
 * Adds a warning for everything worth a reader's attention, and returns whether the run failed:
 * a crash, or a check that found a live row deleted or a dead row left.
 */
function collectProblems(
  summaries: readonly ScenarioSummary[],
  purge: PurgeResult | null,
  purgeError: string | null,
  warnings: string[],
): boolean {
  let failed = purgeError !== null;
  const walNotes = new Set(
    summaries.flatMap((summary) => summary.runs.map((run) => run.wal.note)).filter(Boolean),
  );
  for (const note of walNotes) {
    warnings.push(`WAL: ${note}; the WAL figures there include the workload's and the server's`);
  }
  for (const summary of summaries) {
    for (const error of summary.errors) {
      failed = true;
      warnings.push(`${summary.label} crashed: ${error.split('\n')[0]}`);
    }
    for (const run of summary.runs) {
      const where = `${summary.label}, run ${run.run}`;
      if (run.check.deadRowsLeft > 0 || run.check.liveRowsDeleted !== 0) {
        failed = true;
        warnings.push(
          `${where}: CORRECTNESS: ${run.check.deadRowsLeft} rows dead before the run are left, ` +
            `${run.check.liveRowsDeleted} live rows were deleted`,
        );
      }
      const otherBytes = run.wal.otherBytes ?? 0;
      if (otherBytes > Math.max(1e6, 0.02 * run.wal.totalBytes)) {
        warnings.push(
          `${where}: the server was not idle: ${(otherBytes / 1e6).toFixed(1)} MB of WAL came from other databases (not counted in its WAL figure)`,
        );
      }
      const failedOperations = run.workloadAtRest.failed + run.workloadDuring.failed;
      if (failedOperations > 0) {
        warnings.push(`${where}: ${failedOperations} workload operations failed`);
      }
    }
  }
  if (purge !== null) {
    if (purge.unrevokedRowsDeleted > 0) {
      failed = true;
      warnings.push(
        `purge: CORRECTNESS: ${purge.unrevokedRowsDeleted} rows nobody revoked were deleted`,
      );
    }
    for (const phase of [...purge.phases, ...(purge.burst === null ? [] : [purge.burst])]) {
      if (phase.notDeleted > 0) {
        failed = true;
        warnings.push(`purge: CORRECTNESS: ${phase.notDeleted} revoked rows were never deleted`);
      }
    }
    for (const phase of purge.phases) {
      const achieved = phase.achievedRevocationsPerSecond ?? 0;
      if (achieved < 0.9 * phase.targetRevocationsPerSecond) {
        warnings.push(
          `purge: the revoking connections reached only ${Math.round(achieved)} of ${phase.targetRevocationsPerSecond} revocations/s`,
        );
      }
    }
    if (purge.daemonExitCode !== 0) {
      failed = true;
      warnings.push(`purge: token-reaper start exited with ${purge.daemonExitCode} after SIGTERM`);
    }
  }
  return failed;
}

/** The same for the sources part: a crash, a revoked row never deleted, a wrong condition. */
function collectSourceProblems(
  sources: SourcesResult | null,
  sourcesError: string | null,
  warnings: string[],
): boolean {
  let failed = sourcesError !== null;
  if (sourcesError !== null) warnings.push(`sources crashed: ${sourcesError.split('\n')[0]}`);
  if (sources === null) return failed;
  for (const condition of sources.conditions) {
    for (const error of condition.errors) {
      failed = true;
      warnings.push(`sources, ${condition.condition} crashed: ${error.split('\n')[0]}`);
    }
    if (condition.skipped !== null) {
      warnings.push(`sources: ${condition.condition} skipped: ${condition.skipped}`);
    }
    for (const round of condition.rounds) {
      const where = `sources, ${condition.condition}, round ${round.round}`;
      if (!round.objectsAsExpected) {
        warnings.push(
          `${where}: the objects in place were not the condition's (trigger ${round.objects.trigger}, ` +
            `publication ${round.objects.publication}, slot ${round.objects.slot}): does \`install\` know PURGE_SOURCE=${condition.condition} yet?`,
        );
      }
      if ((round.revokedLeft ?? 0) > 0) {
        failed = true;
        warnings.push(
          `${where}: CORRECTNESS: ${round.revokedLeft} revoked rows were never deleted`,
        );
      }
      if (round.rotation.failed > 0) {
        warnings.push(`${where}: ${round.rotation.failed} rotations failed`);
      }
      if (round.daemonExitCode !== null && round.daemonExitCode !== 0) {
        failed = true;
        warnings.push(
          `${where}: token-reaper start exited with ${round.daemonExitCode} after SIGTERM`,
        );
      }
    }
  }
  for (const latency of sources.latency) {
    const where = `sources, revoke → gone, ${latency.source}`;
    if (latency.error !== null) {
      failed = true;
      warnings.push(`${where} crashed: ${latency.error.split('\n')[0]}`);
    }
    const result = latency.result;
    if (result === null) continue;
    if (result.unrevokedRowsDeleted > 0) {
      failed = true;
      warnings.push(
        `${where}: CORRECTNESS: ${result.unrevokedRowsDeleted} rows nobody revoked were deleted`,
      );
    }
    for (const phase of result.phases) {
      if (phase.notDeleted > 0) {
        failed = true;
        warnings.push(`${where}: CORRECTNESS: ${phase.notDeleted} revoked rows were never deleted`);
      }
      const achieved = phase.achievedRevocationsPerSecond ?? 0;
      if (achieved < 0.9 * phase.targetRevocationsPerSecond) {
        warnings.push(
          `${where}: the revoking connections reached only ${Math.round(achieved)} of ${phase.targetRevocationsPerSecond} revocations/s`,
        );
      }
    }
    if (result.daemonExitCode !== 0) {
      failed = true;
      warnings.push(
        `${where}: token-reaper start exited with ${result.daemonExitCode} after SIGTERM`,
      );
    }
  }
  return failed;
}

function withoutDatabase(template: Template): Omit<Template, 'database'> {
  return Object.fromEntries(Object.entries(template).filter(([key]) => key !== 'database')) as Omit<
    Template,
    'database'
  >;
}

function describeError(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Ctrl-C: stop the children, drop every database made so far, then exit. */
function stopOnSignals(server: BenchServer) {
  const stop = (signal: NodeJS.Signals, code: number) => {
    process.stderr.write(`\nbench: ${signal}, cleaning up\n`);
    void killChildProcesses()
      .then(() => server.dispose())
      .finally(() => process.exit(code));
  };
  process.once('SIGINT', () => stop('SIGINT', 130));
  process.once('SIGTERM', () => stop('SIGTERM', 143));
}

process.exitCode = await main().catch((error: unknown) => {
  process.stderr.write(
    `bench: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`,
  );
  return 1;
});
