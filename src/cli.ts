// The edge of the program: it parses argv, builds the config, the logger and the pool, and
// is the only place that installs signal handlers or decides an exit code.
//
//   0      done
//   1      a runtime failure
//   2      a usage or configuration error, one message on stderr naming what to fix
//   128+n  forced exit on a second signal n
import { constants } from 'node:os';
import { parseArgs } from 'node:util';
import { loadConfig, type Config } from './config.js';
import { createDaemon } from './daemon.js';
import { createDatabasePool, createPlainClient } from './db.js';
import { ConfigurationError } from './errors.js';
import type { ReaperEvents, SweepProgressEvent } from './events.js';
import { explainTargets, formatExplanation } from './explain.js';
import { formatInstallPlanFor, INSTALL_FORMATS, type InstallFormat } from './install-formats.js';
import {
  applyInstallPlan,
  buildInstallPlan,
  formatInstallPlan,
  readAttachedIndexes,
  readRevokeTriggers,
  requireWalPrerequisites,
} from './install.js';
import { applyRolePlan, checkRoleName, formatRolePlan, planRole } from './role.js';
import { createLogger, serializeError, type LogFields, type Logger } from './logger.js';
import { createMetrics, startMetricsServer, type MetricsServer } from './metrics.js';
import { convertToPartitioned } from './partition/convert.js';
import { createStatusLine, formatProgressBar, wantsColors, type StatusLine } from './pretty.js';
import { redactText } from './redact.js';
import { describeTargets, describeTargetsToRun } from './schema.js';
import { uninstall } from './uninstall.js';
import { VERSION } from './version.js';

const USAGE = `token-reaper ${VERSION}: deletes dead refresh tokens and password resets from PostgreSQL.

Usage: token-reaper <command>

Commands:
  start              run the daemon: the schedule and SIGUSR1 sweeps, until SIGTERM or SIGINT
  sweep [--dry-run]  run one sweep now and exit; --dry-run counts what would go, deletes nothing
  install [--print [--for plain|prisma|typeorm|knex]] [--role NAME]
                     apply the SQL objects (idempotent) for PURGE_SOURCE, dropping another
                     source's; --print writes the SQL, changes nothing, and --for writes it as
                     that tool's migration; --role also creates a role with just the rights
                     the daemon needs
  uninstall [--print]
                     remove every object install made: triggers, function, indexes,
                     publication, replication slot, the token_reaper schema; --print writes
                     the SQL, changes nothing
  explain [--json]   show each target's rule as the SQL that will run, how its time columns
                     are read, what is installed and how many rows would go now
  partition convert [--print]
                     turn the plain refresh-tokens table into one partitioned by day of
                     expiry, online and without copying; --print shows the plan
  --help, --version

Every command takes --config PATH: a JSON file of targets (also TOKEN_REAPER_CONFIG).
Configuration comes from the environment; the README lists every variable.
DATABASE_URL (or the PG* variables) names the auth database's primary.`;

/** A graceful stop that has not finished by then is forced; the contract promises 10 s. */
const GRACEFUL_STOP_LIMIT_MS = 9_000;
/** Under npm, a repeat of the first stop signal this soon is npm forwarding it (measured 2–15 ms). */
const NPM_FORWARDED_SIGNAL_MS = 500;
/** How often `start` under npm checks that its parent is still there. */
const PARENT_CHECK_INTERVAL_MS = 500;

type Command = 'start' | 'sweep' | 'install' | 'uninstall' | 'explain' | 'partition convert';

/** What a command gets besides the config, the logger and its flags. */
interface CommandContext {
  environment: NodeJS.ProcessEnv;
  /** The terminal's progress line, when stdout and stderr are both a terminal; else null. */
  statusLine: StatusLine | null;
}

/** Flag values as parseArgs returns them: a boolean, or a string for a flag that takes one. */
type Flags = Record<string, boolean | string | undefined>;

/** --config, which every command takes. */
const COMMON_FLAGS = { config: { type: 'string' } } as const;

const FLAGS: Record<Command, Record<string, { type: 'boolean' | 'string' }>> = {
  start: { ...COMMON_FLAGS },
  sweep: { ...COMMON_FLAGS, 'dry-run': { type: 'boolean' } },
  install: {
    ...COMMON_FLAGS,
    print: { type: 'boolean' },
    for: { type: 'string' },
    role: { type: 'string' },
  },
  uninstall: { ...COMMON_FLAGS, print: { type: 'boolean' } },
  explain: { ...COMMON_FLAGS, json: { type: 'boolean' } },
  'partition convert': { ...COMMON_FLAGS, print: { type: 'boolean' } },
};

export async function main(argv: readonly string[], environment = process.env): Promise<void> {
  // Node would print an uncaught exception and its stack as they are, with whatever password a
  // library quoted in the message. A rejection of main() itself (main.ts awaits it) lands here.
  process.on('uncaughtException', exitOnUncaughtException);
  let invocation: { command: Command; flags: Flags };
  let config: Config;
  try {
    const parsed = parseInvocation(argv);
    if (parsed === 'help') return print(USAGE);
    if (parsed === 'version') return print(VERSION);
    invocation = parsed;
    const configPath = invocation.flags.config;
    config = loadConfig(environment, typeof configPath === 'string' ? { configPath } : {});
  } catch (error) {
    return exitWithError(error);
  }

  // The progress bar goes to stderr, and only when the log lines go to the same screen: it is
  // taken off before each one and drawn again after it.
  const statusLine =
    process.stdout.isTTY && process.stderr.isTTY ? createStatusLine(process.stderr) : null;
  const logger = createLogger({
    level: config.logLevel,
    format: config.logFormat,
    colors: wantsColors(process.stdout.isTTY === true, environment),
    statusLine,
  });
  let code: number;
  try {
    code = await COMMANDS[invocation.command](config, logger, invocation.flags, {
      environment,
      statusLine,
    });
  } catch (error) {
    if (!(error instanceof ConfigurationError)) {
      logger.error('command.failed', `${invocation.command} failed`, { error });
    }
    await logger.flush();
    return exitWithError(error);
  }
  await logger.flush();
  process.exit(code);
}

const COMMANDS: Record<
  Command,
  (
    config: Config,
    logger: Logger,
    flags: Record<string, boolean | string | undefined>,
    context: CommandContext,
  ) => Promise<number>
> = {
  async start(config, logger, _flags, { environment }) {
    // npm runs the daemon through `sh -c`, and where sh is dash a SIGTERM to npm kills that
    // shell but never reaches the daemon: its parent going away is then the only sign that it
    // should stop. (README: run the bin directly instead.)
    const underNpm = startedByNpm(environment);
    const parentPid = process.ppid;
    const pool = await createDatabasePool(config, logger, {
      maximumPoolSize: config.sweep.concurrency + 2,
    });
    const daemon = createDaemon({ config, logger, pool, version: VERSION });
    const stopped = new Promise<void>((resolve) => {
      const stop = onStopSignal(logger, () => daemon.stop().then(resolve), { underNpm });
      if (!underNpm) return;
      const watch = setInterval(() => {
        if (process.ppid === parentPid) return;
        clearInterval(watch);
        stop(`parent process ${parentPid} exited, stopping`, { parentPid });
      }, PARENT_CHECK_INTERVAL_MS).unref();
    });
    process.on('SIGUSR1', () => {
      void daemon.sweep('signal');
    });
    // Without a schedule (NODE_ENV=test) and with the pool's connections closed after an
    // error, nothing else would keep the event loop alive until the stop signal.
    const keepAlive = setInterval(() => undefined, 2 ** 31 - 1);
    let metricsServer: MetricsServer | null = null;
    try {
      if (config.metrics.port !== null) {
        // Before the daemon starts, so that /healthz answers during startup.
        metricsServer = await startMetricsServer({
          metrics: createMetrics(daemon.events, {
            readiness: () => daemon.readiness(),
            health: () => daemon.health(),
            version: VERSION,
          }),
          port: config.metrics.port,
          host: config.metrics.host,
          logger,
        });
      }
      await daemon.start();
      await stopped;
    } catch (error) {
      await daemon.stop();
      throw error;
    } finally {
      clearInterval(keepAlive);
      await metricsServer?.close();
    }
    return 0;
  },

  async sweep(config, logger, flags, { environment, statusLine }) {
    const pool = await createDatabasePool(config, logger, {
      maximumPoolSize: config.sweep.concurrency + 1,
    });
    const daemon = createDaemon({
      config: { ...config, scheduleEnabled: false },
      logger,
      pool,
      version: VERSION,
    });
    // Under npm, Ctrl-C arrives twice; the second must not force the exit.
    onStopSignal(logger, () => daemon.stop(), { underNpm: startedByNpm(environment) });
    const progressBar = statusLine === null ? null : drawProgress(daemon.events, statusLine);
    try {
      // Check the tables first, so that a wrong name is a usage error (exit 2), not a
      // failed sweep (exit 1).
      await describeTargetsToRun(pool, config);
      const outcome = await daemon.sweep('cli', { dryRun: flags['dry-run'] === true });
      progressBar?.end();
      if (outcome.status === 'finished' && outcome.dryRun) {
        for (const [table, result] of Object.entries(outcome.tables)) {
          process.stderr.write(`${table}: ${result.wouldDelete ?? 0} rows would be deleted\n`);
          for (const partition of result.partitions?.partitionsToRemove ?? []) {
            process.stderr.write(
              `${table}: would ${config.sweep.partitions.expiredAction} ${partition}\n`,
            );
          }
          const toCreate = result.partitions?.partitionsToCreate ?? [];
          if (toCreate.length > 0) {
            process.stderr.write(`${table}: would create ${toCreate.length} partitions ahead\n`);
          }
        }
      }
      // A one-shot sweep may be the only one of the day: it stays for the retry of the rows it
      // found locked, which ends within the retry period (or at SIGTERM).
      await daemon.retrySettled();
      return outcome.status === 'failed' ? 1 : 0;
    } finally {
      progressBar?.end();
      await daemon.stop();
    }
  },

  async install(config, logger, flags) {
    // --role NAME: after the install plan, a role with exactly the rights the daemon needs.
    const role = typeof flags.role === 'string' ? checkRoleName(flags.role) : null;
    const format = installFormat(flags, role !== null);
    const pool = await createDatabasePool(config, logger, { maximumPoolSize: 1 });
    const [shapes, attachedIndexes] = await Promise.all([
      describeTargets(pool, config),
      readAttachedIndexes(pool),
    ]).finally(() => pool.end());
    const client = createPlainClient(config, logger);
    await client.connect();
    try {
      const plan = await buildInstallPlan(config, shapes, {
        attachedIndexes,
        revokeTriggers: await readRevokeTriggers(client),
      });
      if (flags.print && role === null) {
        process.stdout.write(formatInstallPlanFor(plan, format));
        return 0;
      }
      // Planned before anything is applied, so that a role it refuses changes nothing.
      const rolePlan =
        role === null
          ? null
          : await planRole(client, role, shapes, {
              source: config.purge.source,
              readsReplicaLag: config.sweep.maxReplicaLagMs !== null,
            });
      if (flags.print) {
        process.stdout.write(`${formatInstallPlan(plan)}\n${formatRolePlan(rolePlan!)}`);
        return 0;
      }
      // Before anything changes: a server that cannot have the slot is a configuration error.
      const published = plan.source.flatMap((step) =>
        step.kind === 'publication' ? step.tables : [],
      );
      if (published.length > 0) await requireWalPrerequisites(client, published);
      const result = await applyInstallPlan(client, plan, logger, config);
      logger.info(
        'install.finished',
        `install finished: ${result.applied.length} applied, ${result.unchanged.length} already in place`,
        { applied: result.applied, unchanged: result.unchanged },
      );
      if (rolePlan !== null) await applyRolePlan(client, rolePlan, logger);
    } finally {
      await client.end();
    }
    return 0;
  },

  async explain(config, logger, flags) {
    const pool = await createDatabasePool(config, logger, { maximumPoolSize: 1 });
    try {
      const explanation = await explainTargets(pool, config);
      process.stdout.write(
        flags.json === true
          ? `${JSON.stringify(explanation, null, 2)}\n`
          : formatExplanation(explanation),
      );
      return explanation.problems.length > 0 ? 2 : 0;
    } finally {
      await pool.end();
    }
  },

  uninstall: (config, logger, flags) => uninstall({ config, logger, print: flags.print === true }),

  'partition convert': (config, logger, flags) =>
    convertToPartitioned({ config, logger, print: flags.print === true }),
};

/** --for: which tool's migration --print writes; a usage error (exit 2) unless it can. */
function installFormat(flags: Flags, withRole: boolean): InstallFormat {
  const format = flags.for;
  if (format === undefined) return 'plain';
  if (!(INSTALL_FORMATS as readonly unknown[]).includes(format)) {
    throw new ConfigurationError([
      `install --for ${JSON.stringify(format)} is not a format: use ${INSTALL_FORMATS.join(', ')}.`,
    ]);
  }
  if (flags.print !== true) {
    throw new ConfigurationError([
      "install --for goes with --print: it writes the SQL as that tool's migration, and changes nothing.",
    ]);
  }
  if (withRole && format !== 'plain') {
    throw new ConfigurationError([
      'install --print --role writes plain SQL only: leave out --for, or print the role with a second run.',
    ]);
  }
  return format as InstallFormat;
}

function parseInvocation(argv: readonly string[]) {
  const [first, ...rest] = argv;
  if (first === undefined || first === '--help' || first === '-h' || first === 'help')
    return 'help';
  if (first === '--version' || first === '-v') return 'version';
  // `partition convert` is the one command of two words.
  const [name, args] =
    first === 'partition' && rest[0] === 'convert'
      ? ['partition convert', rest.slice(1)]
      : [first, rest];
  if (!(name in FLAGS)) {
    throw new ConfigurationError([
      `unknown command ${JSON.stringify([first, ...(first === 'partition' ? rest.slice(0, 1) : [])].join(' '))}. Use start, sweep, install, uninstall, explain or partition convert; run token-reaper --help for usage.`,
    ]);
  }
  const command = name as Command;
  try {
    const { values } = parseArgs({
      args: [...args],
      options: FLAGS[command],
      strict: true,
      allowPositionals: false,
    });
    return { command, flags: values as Flags };
  } catch (error) {
    const known = Object.keys(FLAGS[command]).map((flag) => `--${flag}`);
    throw new ConfigurationError([
      `${(error as Error).message.split('\n')[0]} for ${command}. ${known.length ? `It takes ${known.join(', ')}` : 'It takes no flags'}; run token-reaper --help for usage.`,
    ]);
  }
}

// The first SIGTERM or SIGINT stops gracefully; the same signal again, or a stop that
// outlives its limit, forces the exit. Under npm (`underNpm`) a Ctrl-C arrives twice, from the
// terminal and forwarded by npm, so a repeat within NPM_FORWARDED_SIGNAL_MS is the same one.
// Returns the graceful stop, for other reasons to stop.
/** npx, npm exec and npm run set npm_lifecycle_event for what they run. */
function startedByNpm(environment: NodeJS.ProcessEnv) {
  return environment['npm_lifecycle_event'] !== undefined;
}

function onStopSignal(
  logger: Logger,
  stopGracefully: () => Promise<void>,
  { underNpm = false } = {},
) {
  let stopping = false;
  let first: { signal: 'SIGTERM' | 'SIGINT'; at: number } | undefined;
  const stop = (message: string, fields: LogFields) => {
    if (stopping) return;
    stopping = true;
    logger.info('daemon.stopping', message, fields);
    setTimeout(() => {
      logger.error(
        'daemon.stop_timeout',
        `graceful stop took over ${GRACEFUL_STOP_LIMIT_MS} ms, forcing exit`,
      );
      process.exit(1);
    }, GRACEFUL_STOP_LIMIT_MS).unref();
    void stopGracefully();
  };
  const handle = (signal: 'SIGTERM' | 'SIGINT') => {
    if (stopping) {
      const forwarded =
        underNpm && first?.signal === signal && Date.now() - first.at < NPM_FORWARDED_SIGNAL_MS;
      if (!forwarded) process.exit(128 + constants.signals[signal]);
      return;
    }
    first = { signal, at: Date.now() };
    stop(`${signal} received, stopping`, { signal });
  };
  process.on('SIGTERM', handle);
  process.on('SIGINT', handle);
  return stop;
}

/**
 * The sweep's progress bar on the terminal, redrawn in place from its `progress` events (one a
 * second), in place of the `sweep.progress` log lines. end() takes it off the screen:
 * sweep.finished has the final figures.
 */
function drawProgress(events: ReaperEvents, statusLine: StatusLine) {
  const draw = (progress: SweepProgressEvent) =>
    statusLine.show(formatProgressBar(progress), ['sweep.progress']);
  events.on('progress', draw);
  return {
    end() {
      events.off('progress', draw);
      statusLine.end();
    },
  };
}

function print(text: string) {
  process.stdout.write(`${text}\n`);
}

function exitWithError(error: unknown): never {
  if (error instanceof ConfigurationError) {
    printErrors(error.problems);
    process.exit(2);
  }
  printErrors([serializeError(error).message]);
  process.exit(1);
}

function exitOnUncaughtException(error: unknown): never {
  printErrors([
    `uncaught exception: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`,
  ]);
  process.exit(1);
}

/** The one way errors reach stderr: a line each, through the redaction. */
function printErrors(lines: readonly string[]) {
  process.stderr.write(redactText(lines.map((line) => `token-reaper: ${line}\n`).join('')));
}
