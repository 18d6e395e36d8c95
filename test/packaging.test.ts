// The package as published, loaded the ways its users load it, on the Node that runs the suite
// (CI runs it on the lowest version `engines` claims, on 22 and on 24): require() from
// CommonJS, as a Nest app compiled to CommonJS does; import from an ES module; the bin; and
// the types, from a TypeScript project with Nest's old default resolution (node10) and with
// nodenext.
import { expect } from 'chai';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { repositoryRoot } from './support/cli.js';
import { CONSUMERS_DIRECTORY, installPackageInto, runOrExplain } from './support/consumers.js';

const project = join(CONSUMERS_DIRECTORY, 'scripts');

describe('the published package', function () {
  this.timeout(120_000);

  before(async () => {
    await mkdir(project, { recursive: true });
    await writeFile(join(project, 'package.json'), '{ "private": true, "type": "commonjs" }\n');
    await installPackageInto(project);
  });

  async function runScript(name: string, source: string) {
    await writeFile(join(project, name), source);
    const { stdout } = await runOrExplain(process.execPath, [name], { cwd: project });
    return JSON.parse(stdout) as Record<string, unknown>;
  }

  it('states the Node versions that can load it: require(esm) is in 20.19 and 22.12', async () => {
    const manifest = JSON.parse(await readFile(join(repositoryRoot, 'package.json'), 'utf8'));
    expect(manifest.engines).to.deep.equal({ node: '^20.19.0 || >=22.12.0' });
    const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
    expect(
      (major === 20 && minor >= 19) || (major === 22 && minor >= 12) || major > 22,
      `Node ${process.versions.node} is outside engines, so this run proves nothing about it`,
    ).to.equal(true);
  });

  it('loads with require() from CommonJS, and its errors are the same classes', async () => {
    const result = await runScript(
      'consumer.cjs',
      `const core = require('token-reaper');
       const nest = require('token-reaper/nestjs');
       core.createReaper({ settings: {} }).then(
         () => console.log(JSON.stringify({ rejected: false })),
         (error) => console.log(JSON.stringify({
           createReaper: typeof core.createReaper,
           module: typeof nest.TokenReaperModule.forRootAsync,
           reaper: typeof nest.TokenReaper,
           configurationError: error instanceof core.ConfigurationError,
           message: error.message,
         })),
       );`,
    );
    expect(result).to.include({
      createReaper: 'function',
      module: 'function',
      reaper: 'function',
      configurationError: true,
    });
    expect(result.message).to.include('DATABASE_URL');
  });

  it('loads with import from an ES module, the NestJS entry included', async () => {
    const result = await runScript(
      'consumer.mjs',
      `import { createReaper } from 'token-reaper';
       import { TokenReaperModule, TokenReaperHealthIndicator } from 'token-reaper/nestjs';
       console.log(JSON.stringify({
         createReaper: typeof createReaper,
         module: typeof TokenReaperModule.forRoot,
         health: typeof TokenReaperHealthIndicator,
       }));`,
    );
    expect(result).to.deep.equal({
      createReaper: 'function',
      module: 'function',
      health: 'function',
    });
  });

  it('runs its bin', async () => {
    const manifest = JSON.parse(await readFile(join(repositoryRoot, 'package.json'), 'utf8'));
    const { stdout } = await runOrExplain(
      process.execPath,
      ['node_modules/token-reaper/dist/main.js', '--version'],
      { cwd: project },
    );
    expect(stdout.trim()).to.equal(manifest.version);
  });

  for (const resolution of ['node10', 'nodenext'] as const) {
    it(`type-checks a CommonJS TypeScript consumer with ${resolution} resolution`, async () => {
      const directory = join(CONSUMERS_DIRECTORY, `types-${resolution}`);
      await mkdir(directory, { recursive: true });
      await writeFile(join(directory, 'package.json'), '{ "private": true }\n');
      await installPackageInto(directory);
      await writeFile(
        join(directory, 'tsconfig.json'),
        JSON.stringify({
          compilerOptions: {
            module: resolution === 'node10' ? 'commonjs' : 'nodenext',
            moduleResolution: resolution,
            // As \`nest new\` sets them: skipLibCheck, since slonik's types need esModuleInterop.
            target: 'ES2022',
            strict: true,
            noEmit: true,
            skipLibCheck: true,
            allowSyntheticDefaultImports: true,
            types: [],
          },
          files: ['consumer.ts'],
        }),
      );
      await writeFile(
        join(directory, 'consumer.ts'),
        `import {
           TokenReaper,
           TokenReaperModule,
           type SweepOutcome,
           type TokenReaperStatus,
         } from 'token-reaper/nestjs';
         export const module = TokenReaperModule.forRoot({ settings: { DATABASE_URL: 'x' } });
         export async function sweep(reaper: TokenReaper): Promise<SweepOutcome['status']> {
           const status: TokenReaperStatus = reaper.status();
           return status.up ? (await reaper.sweep()).status : 'skipped';
         }
         // @ts-expect-error: settings are required
         TokenReaperModule.forRoot({});
        `,
      );
      const tsc = join(repositoryRoot, 'node_modules/typescript/bin/tsc');
      await runOrExplain(process.execPath, [tsc, '-p', directory]);
    });
  }
});
