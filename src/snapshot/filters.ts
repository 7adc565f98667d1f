import { invalidArgument } from '../errdefs/errors';
import type { Info } from '../store/types';
import { kindName } from '../store/types';

/**
 * containerd's filter syntax, as sent by its List calls:
 *
 *   filters := filter ( "," filter )*          (all must match)
 *   filter  := fieldpath [ op value ]          (no op: field is present)
 *   op      := "==" | "!=" | "~="
 *   fieldpath := part ( "." part )*,  part := [A-Za-z0-9_]+ | quoted
 *   value   := quoted | run of characters other than "," and spaces
 *
 * Several filter strings in one request are OR-ed, as in containerd.
 * Fields of a snapshot: name, parent, kind, labels.<key>.
 */

type Op = '==' | '!=' | '~=' | 'present';

interface Clause {
  path: string[];
  op: Op;
  value: string;
  re?: RegExp;
}

export type Matcher = (info: Info) => boolean;

class Scanner {
  pos = 0;
  constructor(readonly src: string) {}
  peek(n = 0): string {
    return this.src[this.pos + n] ?? '';
  }
  eof(): boolean {
    return this.pos >= this.src.length;
  }
  skipSpace(): void {
    while (/\s/.test(this.peek())) this.pos++;
  }
  fail(msg: string): never {
    throw invalidArgument(`invalid filter ${JSON.stringify(this.src)} at offset ${this.pos}: ${msg}`);
  }
  quoted(): string {
    const q = this.peek();
    this.pos++;
    let out = '';
    for (;;) {
      if (this.eof()) this.fail('unterminated quoted string');
      const c = this.peek();
      this.pos++;
      if (c === q) return out;
      if (c === '\\' && q === '"') {
        const e = this.peek();
        this.pos++;
        const map: Record<string, string> = { n: '\n', t: '\t', r: '\r', '\\': '\\', '"': '"', '/': '/' };
        if (!(e in map)) this.fail(`unknown escape \\${e}`);
        out += map[e];
      } else {
        out += c;
      }
    }
  }
}

function parseClause(s: Scanner): Clause {
  const path: string[] = [];
  s.skipSpace();
  for (;;) {
    if (s.peek() === '"') {
      path.push(s.quoted());
    } else {
      const m = /^[A-Za-z0-9_]+/.exec(s.src.slice(s.pos));
      if (!m) s.fail('expected a field name');
      path.push(m[0]);
      s.pos += m[0].length;
    }
    if (s.peek() === '.') {
      s.pos++;
      continue;
    }
    break;
  }
  s.skipSpace();
  const two = s.peek() + s.peek(1);
  if (two === '==' || two === '!=' || two === '~=') {
    s.pos += 2;
    s.skipSpace();
    let value: string;
    const c = s.peek();
    if (c === '"' || (two === '~=' && (c === '/' || c === '|'))) {
      value = s.quoted();
    } else {
      const m = /^[^,\s]+/.exec(s.src.slice(s.pos));
      if (!m) s.fail(`expected a value after ${two}`);
      value = m[0];
      s.pos += value.length;
    }
    const clause: Clause = { path, op: two, value };
    if (two === '~=') {
      try {
        clause.re = new RegExp(value);
      } catch (err) {
        s.fail(`bad regular expression ${JSON.stringify(value)}: ${(err as Error).message}`);
      }
    }
    s.skipSpace();
    return clause;
  }
  return { path, op: 'present', value: '' };
}

/** Parses one filter string (clauses joined by ","). */
function parseFilter(src: string): Clause[] {
  const s = new Scanner(src);
  const clauses: Clause[] = [];
  s.skipSpace();
  if (s.eof()) return clauses;
  for (;;) {
    clauses.push(parseClause(s));
    if (s.eof()) break;
    if (s.peek() !== ',') s.fail(`expected "," or end of filter, got ${JSON.stringify(s.peek())}`);
    s.pos++;
  }
  return clauses;
}

function field(info: Info, path: string[]): string | undefined {
  const [head, ...rest] = path;
  switch (head) {
    case 'name':
      return rest.length === 0 ? info.name : undefined;
    case 'parent':
      return rest.length === 0 ? info.parent : undefined;
    case 'kind':
      return rest.length === 0 ? kindName(info.kind) : undefined;
    case 'labels': {
      if (rest.length === 0) return Object.keys(info.labels).length > 0 ? 'true' : undefined;
      const k = rest.join('.');
      return Object.prototype.hasOwnProperty.call(info.labels, k) ? info.labels[k] : undefined;
    }
    default:
      return undefined;
  }
}

function matchClause(info: Info, c: Clause): boolean {
  const v = field(info, c.path);
  switch (c.op) {
    case 'present':
      return v !== undefined && v !== '';
    case '==':
      return v === c.value;
    case '!=':
      return v !== c.value;
    case '~=':
      return v !== undefined && (c.re as RegExp).test(v);
  }
}

/** Compiles the filters of one List request. No filters match everything. */
export function compileFilters(filters: readonly string[]): Matcher {
  const alternatives = filters.filter((f) => f.trim() !== '').map(parseFilter);
  if (alternatives.length === 0) return () => true;
  return (info) => alternatives.some((clauses) => clauses.every((c) => matchClause(info, c)));
}
