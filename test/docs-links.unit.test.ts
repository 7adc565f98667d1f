/**
 * The documentation's relative links: every link in README.md and
 * docs/*.md names a file or directory of the repository that exists and,
 * with `#anchor`, a heading of that Markdown file (as GitHub spells
 * anchors). And no page cites a design note that is not in the
 * repository. Fast, no root.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

const REPO = path.resolve(__dirname, '..', '..');

function pages(): string[] {
  const docs = path.join(REPO, 'docs');
  return [path.join(REPO, 'README.md'), ...fs.readdirSync(docs).filter((f) => f.endsWith('.md')).sort().map((f) => path.join(docs, f))];
}

/** The lines of a Markdown file outside fenced code blocks, with their numbers. */
function proseLines(text: string): { n: number; line: string }[] {
  const out: { n: number; line: string }[] = [];
  let fence: string | null = null;
  text.split('\n').forEach((line, i) => {
    const m = /^\s*(```|~~~)/.exec(line);
    if (m) {
      if (fence === null) fence = m[1];
      else if (fence === m[1]) fence = null;
      return;
    }
    if (fence === null) out.push({ n: i + 1, line });
  });
  return out;
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens; repeats get -1, -2, … */
export function headingAnchors(text: string): Set<string> {
  const seen = new Map<string, number>();
  const anchors = new Set<string>();
  for (const { line } of proseLines(text)) {
    const m = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (!m) continue;
    const base = m[1]
      .replace(/\[([^\]]*)\]\([^)]*\)/g, '$1')
      .toLowerCase()
      .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
      .replace(/ /g, '-');
    const k = seen.get(base) ?? 0;
    seen.set(base, k + 1);
    anchors.add(k === 0 ? base : `${base}-${k}`);
  }
  return anchors;
}

/** Inline links `[text](target)` of a line, inline code removed first. */
function linksOf(line: string): string[] {
  const bare = line.replace(/`[^`]*`/g, '');
  const out: string[] = [];
  for (const m of bare.matchAll(/\]\(([^)\s]+)(?:\s+"[^"]*")?\)/g)) out.push(m[1]);
  return out;
}

test('every relative link in README.md and docs/*.md names an existing file and heading', () => {
  const broken: string[] = [];
  for (const page of pages()) {
    const rel = path.relative(REPO, page);
    for (const { n, line } of proseLines(fs.readFileSync(page, 'utf8'))) {
      for (const target of linksOf(line)) {
        if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // http:, https:, mailto:, file:
        const [file, anchor] = target.split('#', 2) as [string, string | undefined];
        const dest = file === '' ? page : path.resolve(path.dirname(page), decodeURI(file));
        if (!dest.startsWith(REPO + path.sep) && dest !== REPO) {
          broken.push(`${rel}:${n}: ${target}: points outside the repository`);
          continue;
        }
        if (!fs.existsSync(dest)) {
          broken.push(`${rel}:${n}: ${target}: no such file ${path.relative(REPO, dest)}`);
          continue;
        }
        if (anchor === undefined) continue;
        if (!dest.endsWith('.md')) {
          broken.push(`${rel}:${n}: ${target}: an anchor into a file that is not Markdown`);
          continue;
        }
        if (!headingAnchors(fs.readFileSync(dest, 'utf8')).has(decodeURIComponent(anchor))) {
          broken.push(`${rel}:${n}: ${target}: no heading with anchor #${anchor} in ${path.relative(REPO, dest)}`);
        }
      }
    }
  }
  assert.deepEqual(broken, [], `broken links:\n${broken.join('\n')}`);
});

test('no page cites ARCHITECTURE.md or "§" sections of a file outside the repository', () => {
  const found: string[] = [];
  for (const page of pages()) {
    fs.readFileSync(page, 'utf8')
      .split('\n')
      .forEach((line, i) => {
        if (/ARCHITECTURE\.md|§/.test(line)) found.push(`${path.relative(REPO, page)}:${i + 1}: ${line.trim()}`);
      });
  }
  assert.deepEqual(found, [], `citations of documents not in the repository:\n${found.join('\n')}`);
});

test('anchors are spelled as GitHub spells them', () => {
  const a = headingAnchors('# Lazy pull (CRI)\n## `dedup-snapshotter pull` for ctr users\n### 1. Pulling fails (镜像拉取失败)\n## GET /stats\n## Tests\n## Tests\n```\n# not a heading\n```\n');
  assert.deepEqual([...a], ['lazy-pull-cri', 'dedup-snapshotter-pull-for-ctr-users', '1-pulling-fails-镜像拉取失败', 'get-stats', 'tests', 'tests-1']);
});
