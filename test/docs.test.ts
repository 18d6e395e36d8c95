// The README and docs/ as a reader meets them, without a database: every relative link opens a
// file of this repository that the package ships, every #anchor names a heading of its file,
// the README stays a front door, no document points at one the reader cannot open, and the
// README's NestJS example is the one test/embedding.test.ts runs.
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, extname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

import { expect } from 'chai';

const root = fileURLToPath(new URL('../', import.meta.url));
const README_MAX_LINES = 260;
/** Directories that hold no documentation of ours. */
const NOT_DOCUMENTATION = new Set(['node_modules', 'dist', '.git', '.demo', 'bench-results']);

const read = (path: string) => readFileSync(join(root, path), 'utf8');

/** README.md and docs/**\/*.md, relative to the repository root. */
function documents(): string[] {
  return ['README.md', ...markdownFiles('docs')];
}

function markdownFiles(directory: string): string[] {
  const found: string[] = [];
  const walk = (relativeDirectory: string) => {
    for (const entry of readdirSync(join(root, relativeDirectory), { withFileTypes: true })) {
      const path = relativeDirectory === '' ? entry.name : join(relativeDirectory, entry.name);
      if (entry.isDirectory()) {
        if (!NOT_DOCUMENTATION.has(entry.name)) walk(path);
      } else if (extname(entry.name).toLowerCase() === '.md') {
        found.push(path);
      }
    }
  };
  walk(directory);
  return found.sort();
}

/** The text outside fenced code blocks, line for line (fenced lines become empty). */
function withoutFences(markdown: string): string {
  let fence: string | undefined;
  return markdown
    .split('\n')
    .map((line) => {
      const marker = /^ {0,3}(`{3,}|~{3,})/.exec(line)?.[1];
      if (fence === undefined) {
        if (marker !== undefined) fence = marker;
        return fence === undefined ? line : '';
      }
      if (marker !== undefined && marker[0] === fence[0] && marker.length >= fence.length) {
        fence = undefined;
      }
      return '';
    })
    .join('\n');
}

const withoutCodeSpans = (text: string) => text.replace(/`[^`]*`/g, '');

/** Every link target outside code: inline links and images, reference definitions, hrefs. */
function linkTargets(markdown: string): string[] {
  const text = withoutCodeSpans(withoutFences(markdown));
  const targets: string[] = [];
  for (const match of text.matchAll(/\]\(\s*<?([^)\s>]+)>?(?:\s+["'(][^)]*)?\)/g)) {
    targets.push(match[1]!);
  }
  for (const match of text.matchAll(/^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?/gm)) {
    targets.push(match[1]!);
  }
  for (const match of text.matchAll(/\b(?:href|src)\s*=\s*["']([^"']+)["']/g)) {
    targets.push(match[1]!);
  }
  return targets;
}

const isExternal = (target: string) => /^[a-z][a-z0-9+.-]*:/i.test(target) || /^\/\//.test(target);

/** GitHub's anchor for a heading: its text as rendered, lower-cased, punctuation dropped. */
function githubSlug(heading: string): string {
  const text = heading
    .split(/(`[^`]*`)/)
    .map((part) =>
      part.startsWith('`') && part.endsWith('`') && part.length >= 2
        ? part.slice(1, -1)
        : part
            .replace(/!?\[([^\]]*)\]\([^)]*\)/g, '$1')
            .replace(/<[^>]+>/g, '')
            .replace(/(^|[^\p{L}\p{N}])_([^_]+)_(?=$|[^\p{L}\p{N}])/gu, '$1$2'),
    )
    .join('');
  return text
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
    .replace(/ /g, '-');
}

/** The anchors of a markdown file's headings, with GitHub's -1, -2… for repeated ones. */
function anchors(markdown: string): Set<string> {
  const seen = new Map<string, number>();
  const result = new Set<string>();
  for (const line of withoutFences(markdown).split('\n')) {
    const heading = /^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/.exec(line)?.[1];
    if (heading === undefined) continue;
    const slug = githubSlug(heading);
    const count = seen.get(slug) ?? 0;
    seen.set(slug, count + 1);
    result.add(count === 0 ? slug : `${slug}-${count}`);
  }
  return result;
}

/** What the package ships: package.json's "files", and what npm always includes. */
function shipped(path: string): boolean {
  const files = (JSON.parse(read('package.json')) as { files?: string[] }).files ?? [];
  const first = path.split(sep)[0]!;
  return path === 'README.md' || path === 'package.json' || files.includes(first);
}

describe('the documentation', () => {
  it('has a README and docs to check', () => {
    expect(documents()).to.include('README.md');
    expect(documents().filter((path) => path.startsWith(`docs${sep}`))).to.have.length.above(0);
  });

  it('makes anchors as GitHub does', () => {
    expect(githubSlug('Signals (`start`)')).to.equal('signals-start');
    expect(githubSlug('Three ways to learn of a revocation: `PURGE_SOURCE`')).to.equal(
      'three-ways-to-learn-of-a-revocation-purge_source',
    );
    expect(githubSlug('`sweep.finished`')).to.equal('sweepfinished');
    expect(githubSlug('Gentle sweep: time-sized batches, pauses, replica lag')).to.equal(
      'gentle-sweep-time-sized-batches-pauses-replica-lag',
    );
    expect([...anchors('# A\n\n```\n# not a heading\n```\n\n## A\n')]).to.deep.equal(['a', 'a-1']);
  });

  it('has relative links that open a shipped file of this repository, and anchors that name a heading', () => {
    const problems: string[] = [];
    let checked = 0;
    for (const document of documents()) {
      for (const target of linkTargets(read(document))) {
        if (isExternal(target)) continue;
        checked += 1;
        const hash = target.indexOf('#');
        const pathPart = decodeURIComponent(hash === -1 ? target : target.slice(0, hash));
        const anchor = hash === -1 ? undefined : decodeURIComponent(target.slice(hash + 1));
        const absolute =
          pathPart === '' ? join(root, document) : resolve(root, dirname(document), pathPart);
        const path = relative(root, absolute);
        if (path.startsWith('..') || path === '') {
          problems.push(`${document}: ${target} leaves the repository`);
          continue;
        }
        if (!existsSync(absolute)) {
          problems.push(`${document}: ${target} does not exist`);
          continue;
        }
        if (!shipped(path)) {
          problems.push(`${document}: ${target} is not in the package ("files" in package.json)`);
        }
        if (anchor !== undefined) {
          if (statSync(absolute).isDirectory() || extname(absolute).toLowerCase() !== '.md') {
            problems.push(`${document}: ${target} has an anchor, but is not a markdown file`);
          } else if (!anchors(readFileSync(absolute, 'utf8')).has(anchor)) {
            problems.push(`${document}: ${target}: no heading in ${path} makes #${anchor}`);
          }
        }
      }
    }
    expect(problems).to.deep.equal([]);
    expect(checked).to.be.greaterThan(20);
  });

  it('links every document in docs/ from the README', () => {
    const linked = new Set(
      linkTargets(read('README.md'))
        .filter((target) => !isExternal(target))
        .map((target) => relative(root, resolve(root, target.split('#')[0]!))),
    );
    const unlinked = markdownFiles('docs').filter((path) => !linked.has(path));
    expect(unlinked, 'documents the README does not link').to.deep.equal([]);
  });

  it(`keeps the README to at most ${README_MAX_LINES} lines`, () => {
    const lines = read('README.md').replace(/\n$/, '').split('\n').length;
    expect(lines).to.be.at.most(README_MAX_LINES);
  });

  it('mentions no DESIGN.md, which no reader can open, in any markdown file', () => {
    const mentions = markdownFiles('').filter((path) => /DESIGN\.md/i.test(read(path)));
    expect(mentions).to.deep.equal([]);
  });

  it('shows the createReaper provider that test/embedding.test.ts runs', () => {
    const example = codeBlocks('docs/nestjs.md').find((code) =>
      code.includes('class TokenCleanupService'),
    );
    expect(example, 'docs/nestjs.md has a TokenCleanupService example').to.be.a('string');
    const test = read('test/embedding.test.ts');
    const testClass = /class TokenCleanupService[\s\S]*?\n}\n/.exec(test)?.[0];
    expect(testClass, 'test/embedding.test.ts has a TokenCleanupService').to.be.a('string');
    // The methods the provider defines, and what each one asks of the reaper.
    const shape = (code: string) => ({
      methods: [...code.matchAll(/^ {2}(?:async )?(\w+)\(\)/gm)].map((match) => match[1]),
      calls: [...code.matchAll(/this\.reaper[?!]?\.([\w.]+)\(/g)].map((match) => match[1]),
    });
    expect(shape(example!)).to.deep.equal(shape(testClass!));
    expect(example).to.include("from 'token-reaper'");
  });

  it('shows the NestJS module as the Nest test app configures it', () => {
    const example = codeBlocks('README.md').find((code) => code.includes('TokenReaperModule'));
    expect(example, 'the README has a TokenReaperModule example').to.be.a('string');
    const app = read('test/fixtures/nestjs/app/app.cjs');
    // Each call the example makes on a Nest or token-reaper module, the test app makes too.
    const calls = (code: string) =>
      new Set([...code.matchAll(/\b([A-Z]\w+Module)\.(forRoot\w*)\(/g)].map((match) => match[0]));
    expect([...calls(example!)].filter((call) => !calls(app).has(call))).to.deep.equal([]);
    for (const key of ['imports: [ConfigModule]', 'inject: [ConfigService]', 'settings:']) {
      expect(example).to.include(key);
      expect(app).to.include(key);
    }
  });
});

/** The ```ts blocks of a markdown file. */
function codeBlocks(path: string): string[] {
  return [...read(path).matchAll(/```ts\n([\s\S]*?)```/g)].map((match) => match[1]!);
}
