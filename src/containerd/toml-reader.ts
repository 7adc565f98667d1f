/**
 * Just enough TOML to find containerd's `[proxy_plugins.<name>]` entries:
 * table headers (`[a."b"]`, `[[a]]`), `key = value` lines with bare, quoted
 * and dotted keys, basic and literal strings, inline tables
 * (`dedup = { type = "snapshot", address = "…" }`), comments, and skipping
 * multi-line strings and arrays. Anything else is read past, not validated:
 * containerd itself reports a malformed file.
 */

export interface ProxyPluginEntry {
  /** The snapshotter name containerd registers (`dedup` in `[proxy_plugins.dedup]`). */
  name: string;
  type?: string;
  address?: string;
  /** 1-based line where the entry was first seen. */
  line: number;
}

export interface ContainerdTomlFacts {
  plugins: Map<string, ProxyPluginEntry>;
  /** An explicit `[proxy_plugins]` header exists (a snippet must not repeat it). */
  hasProxyPluginsHeader: boolean;
  /** The file has a top-level `imports` key: other files may add proxy plugins too. */
  hasImports: boolean;
  /** Every `BinaryName = "…"` (a runc runtime's binary), with the table it is in. */
  runcBinaries: { table: string; value: string; line: number }[];
}

/**
 * Visits each character of `s` outside TOML strings (basic strings with
 * backslash escapes, literal strings without); `visit` returning true stops
 * the scan. Returns the index it stopped at, or -1.
 */
function scanUnquoted(s: string, visit: (c: string, i: number) => boolean | void): number {
  let q: '"' | "'" | null = null;
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (q === '"') {
      if (c === '\\') i++;
      else if (c === '"') q = null;
    } else if (q === "'") {
      if (c === "'") q = null;
    } else if (c === '"' || c === "'") {
      q = c;
    } else if (visit(c, i) === true) {
      return i;
    }
  }
  return -1;
}

/** Index of the first `ch` outside quotes in `s`, or -1. */
function indexOutsideQuotes(s: string, ch: string): number {
  return scanUnquoted(s, (c) => c === ch);
}

function stripComment(line: string): string {
  const i = indexOutsideQuotes(line, '#');
  return (i < 0 ? line : line.slice(0, i)).trim();
}

/** Reads a basic ("…") or literal ('…') string at the start of `s`: its value and length, or null. */
function readString(s: string): { value: string; length: number } | null {
  if (s.startsWith("'")) {
    const end = s.indexOf("'", 1);
    return end < 0 ? null : { value: s.slice(1, end), length: end + 1 };
  }
  if (!s.startsWith('"')) return null;
  let out = '';
  for (let i = 1; i < s.length; i++) {
    const c = s[i];
    if (c === '"') return { value: out, length: i + 1 };
    if (c !== '\\') {
      out += c;
      continue;
    }
    const e = s[++i];
    const simple: Record<string, string> = { b: '\b', t: '\t', n: '\n', f: '\f', r: '\r', '"': '"', '\\': '\\' };
    if (e in simple) out += simple[e];
    else if (e === 'u' || e === 'U') {
      const n = e === 'u' ? 4 : 8;
      const hex = s.slice(i + 1, i + 1 + n);
      if (!/^[0-9a-fA-F]+$/.test(hex) || hex.length !== n) return null;
      out += String.fromCodePoint(parseInt(hex, 16));
      i += n;
    } else return null;
  }
  return null;
}

/** `a."b c".'d'` → ["a", "b c", "d"]; null if it is not a key. */
export function parseKey(s: string): string[] | null {
  const parts: string[] = [];
  let rest = s.trim();
  for (;;) {
    let part: string;
    if (rest.startsWith('"') || rest.startsWith("'")) {
      const str = readString(rest);
      if (!str) return null;
      part = str.value;
      rest = rest.slice(str.length).trimStart();
    } else {
      const m = /^[A-Za-z0-9_-]+/.exec(rest);
      if (!m) return null;
      part = m[0];
      rest = rest.slice(m[0].length).trimStart();
    }
    parts.push(part);
    if (rest === '') return parts;
    if (!rest.startsWith('.')) return null;
    rest = rest.slice(1).trimStart();
  }
}

/** Splits `s` at top-level commas (outside quotes, braces and brackets). */
function splitTopLevel(s: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let start = 0;
  scanUnquoted(s, (c, i) => {
    if (c === '{' || c === '[') depth++;
    else if (c === '}' || c === ']') depth--;
    else if (c === ',' && depth === 0) {
      out.push(s.slice(start, i));
      start = i + 1;
    }
  });
  out.push(s.slice(start));
  return out.map((x) => x.trim()).filter((x) => x !== '');
}

type Value = { kind: 'string'; value: string } | { kind: 'table'; entries: [string[], Value][] } | { kind: 'other' };

function parseValue(s: string): Value {
  const v = s.trim();
  if (v.startsWith('"') || v.startsWith("'")) {
    const str = readString(v);
    return str ? { kind: 'string', value: str.value } : { kind: 'other' };
  }
  if (v.startsWith('{') && v.endsWith('}')) {
    const entries: [string[], Value][] = [];
    for (const pair of splitTopLevel(v.slice(1, -1))) {
      const eq = indexOutsideQuotes(pair, '=');
      const key = eq < 0 ? null : parseKey(pair.slice(0, eq));
      if (key) entries.push([key, parseValue(pair.slice(eq + 1))]);
    }
    return { kind: 'table', entries };
  }
  return { kind: 'other' };
}

/** Net count of `[` minus `]` outside quotes: how far an array value is still open. */
function bracketBalance(s: string): number {
  let n = 0;
  scanUnquoted(s, (c) => {
    if (c === '[') n++;
    else if (c === ']') n--;
  });
  return n;
}

export function readContainerdToml(text: string): ContainerdTomlFacts {
  const facts: ContainerdTomlFacts = { plugins: new Map(), hasProxyPluginsHeader: false, hasImports: false, runcBinaries: [] };
  let table: string[] = [];
  let multiline: '"""' | "'''" | null = null;
  let openArrays = 0;
  const lines = text.split(/\r?\n/);

  const entry = (name: string, line: number): ProxyPluginEntry => {
    let e = facts.plugins.get(name);
    if (!e) {
      e = { name, line };
      facts.plugins.set(name, e);
    }
    return e;
  };
  const assign = (full: string[], value: Value, line: number): void => {
    if (value.kind === 'table') {
      for (const [k, v] of value.entries) if (full[0] !== 'proxy_plugins') assign([...full, ...k], v, line);
    }
    if (full[full.length - 1] === 'BinaryName' && value.kind === 'string') {
      facts.runcBinaries.push({ table: full.slice(0, -1).map((k) => (/^[A-Za-z0-9_-]+$/.test(k) ? k : JSON.stringify(k))).join('.'), value: value.value, line });
    }
    if (full[0] !== 'proxy_plugins') return;
    if (full.length === 2 && value.kind === 'table') {
      entry(full[1], line);
      for (const [k, v] of value.entries) assign([...full, ...k], v, line);
      return;
    }
    if (full.length !== 3) return;
    const e = entry(full[1], line);
    if (value.kind !== 'string') return;
    if (full[2] === 'type') e.type = value.value;
    if (full[2] === 'address') e.address = value.value;
  };

  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i];
    if (multiline) {
      if (raw.includes(multiline)) multiline = null;
      continue;
    }
    if (openArrays > 0) {
      openArrays += bracketBalance(stripComment(raw));
      continue;
    }
    const line = stripComment(raw);
    if (line === '') continue;
    const header = /^\[\[(.*)\]\]$/.exec(line) ?? /^\[(.*)\]$/.exec(line);
    if (header) {
      table = parseKey(header[1]) ?? ['(unparsed)'];
      if (table.length === 1 && table[0] === 'proxy_plugins' && !line.startsWith('[[')) facts.hasProxyPluginsHeader = true;
      if (table.length === 2 && table[0] === 'proxy_plugins') entry(table[1], i + 1);
      continue;
    }
    const eq = indexOutsideQuotes(line, '=');
    if (eq < 0) continue;
    const key = parseKey(line.slice(0, eq));
    const rhs = line.slice(eq + 1).trim();
    for (const delim of ['"""', "'''"] as const) {
      // A multi-line string that does not close on this line: skip to its end.
      if (rhs.startsWith(delim) && !rhs.slice(3).includes(delim)) multiline = delim;
    }
    if (multiline) continue;
    if (rhs.startsWith('[')) {
      const open = bracketBalance(rhs);
      if (open > 0) openArrays = open;
    }
    if (!key) continue;
    if (table.length === 0 && key.length === 1 && key[0] === 'imports') facts.hasImports = true;
    assign([...table, ...key], parseValue(rhs), i + 1);
  }
  return facts;
}

/** A TOML basic string of `s`. */
export function tomlString(s: string): string {
  return JSON.stringify(s);
}

/** The lines to add to containerd's config for the proxy plugin `name` at `address`. */
export function proxyPluginSnippet(address: string, opts: { withHeader: boolean; name?: string } = { withHeader: true }): string {
  const name = opts.name ?? 'dedup';
  const lines = [`  [proxy_plugins.${name}]`, `    type = "snapshot"`, `    address = ${tomlString(address)}`];
  return (opts.withHeader ? ['[proxy_plugins]', ...lines] : lines).join('\n');
}
