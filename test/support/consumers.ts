// token-reaper as its users get it: built the way `npm publish` ships it (package.json's
// `files`), and put into the node_modules of a consumer project. The projects live in
// .cache/consumers, inside this repository, so the package's own dependencies resolve from its
// node_modules, while what a project installs itself (NestJS 10 or 11, Jest) wins over ours.
// (Not under node_modules/.cache: Jest finds no spec in a project under a node_modules.)
//   - test/packaging.test.ts: a CommonJS script and an ES module script;
//   - test/nestjs.test.ts: the Nest apps of test/fixtures/nestjs, installed from their own
//     package-lock.json with `npm ci` the first time, which needs the npm registry.
import { execFile, type ExecFileOptions } from 'node:child_process';
import { cp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { repositoryRoot } from './cli.js';

const run = promisify(execFile);

export const CONSUMERS_DIRECTORY = join(repositoryRoot, '.cache/consumers');
const NEST_FIXTURES = join(repositoryRoot, 'test/fixtures/nestjs');

let built: Promise<string> | null = null;

/** The package as published, built from the sources once per run; returns its directory. */
export function buildPackage(): Promise<string> {
  built ??= (async () => {
    const directory = join(CONSUMERS_DIRECTORY, 'package');
    await rm(directory, { recursive: true, force: true });
    await mkdir(directory, { recursive: true });
    const tsc = join(repositoryRoot, 'node_modules/typescript/bin/tsc');
    await runOrExplain(process.execPath, [
      tsc,
      '-p',
      join(repositoryRoot, 'tsconfig.build.json'),
      '--outDir',
      join(directory, 'dist'),
    ]);
    const manifest = JSON.parse(await readFile(join(repositoryRoot, 'package.json'), 'utf8')) as {
      files: string[];
    };
    await cp(join(repositoryRoot, 'package.json'), join(directory, 'package.json'));
    for (const entry of manifest.files.filter((name) => name !== 'dist')) {
      await cp(join(repositoryRoot, entry), join(directory, entry), { recursive: true });
    }
    return directory;
  })();
  return built;
}

/** A project directory with the built package in its node_modules/token-reaper. */
export async function installPackageInto(project: string): Promise<void> {
  const target = join(project, 'node_modules/token-reaper');
  await rm(target, { recursive: true, force: true });
  await cp(await buildPackage(), target, { recursive: true });
}

export type NestFixture = 'nest10' | 'nest11';

/**
 * test/fixtures/nestjs/<fixture>'s project, installed (again only when its lock file changed),
 * with the app files of test/fixtures/nestjs/app and the built package; returns its directory.
 */
export async function prepareNestProject(fixture: NestFixture): Promise<string> {
  const project = join(CONSUMERS_DIRECTORY, fixture);
  const lock = await readFile(join(NEST_FIXTURES, fixture, 'package-lock.json'), 'utf8');
  const installedLock = await readFile(join(project, 'package-lock.json'), 'utf8').catch(() => '');
  const installed = await readFile(join(project, 'node_modules/.package-lock.json'), 'utf8').then(
    () => true,
    () => false,
  );
  if (!installed || installedLock !== lock) {
    await rm(project, { recursive: true, force: true });
    await mkdir(project, { recursive: true });
    await cp(join(NEST_FIXTURES, fixture, 'package.json'), join(project, 'package.json'));
    await writeFile(join(project, 'package-lock.json'), lock);
    // No install scripts: none of these packages needs one, and npm 11 asks before running them.
    await runOrExplain('npm', ['ci', '--ignore-scripts', '--no-audit', '--no-fund'], {
      cwd: project,
      timeout: 10 * 60_000,
    });
  }
  await cp(join(NEST_FIXTURES, 'app'), project, { recursive: true });
  await installPackageInto(project);
  return project;
}

/** Runs a command; a failure's message carries its output. */
export async function runOrExplain(
  command: string,
  args: readonly string[],
  options: ExecFileOptions = {},
): Promise<{ stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(command, args, { ...options, encoding: 'utf8' });
    return { stdout: String(stdout), stderr: String(stderr) };
  } catch (error) {
    const { stdout = '', stderr = '' } = error as { stdout?: string; stderr?: string };
    throw new Error(
      `${command} ${args.join(' ')} failed: ${(error as Error).message}\n${stdout}\n${stderr}`,
      { cause: error },
    );
  }
}
