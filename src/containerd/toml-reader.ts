/**
 * Just enough TOML to find what containerd's config says about this
 * snapshotter: the `[proxy_plugins.<name>]` entries (and their exports), the
 * transfer service's unpack_config list (`[[…unpack_config]]` arrays of
 * tables, or an inline array), CRI's image snapshotter settings in both
 * layouts (version 2: `plugins."io.containerd.grpc.v1.cri".containerd`,
 * version 3: `plugins.'io.containerd.cri.v1.images'`) and the file's
 * `version`. Understood: table headers (`[a."b".'c']`, `[[a]]`), `key =
 * value` lines with bare, quoted and dotted keys, basic and literal strings,
 * booleans, integers, inline tables and arrays (also over several lines),
 * comments, and skipping multi-line strings. Anything else is read past,
 * not validated: containerd itself reports a malformed file.
 */

/** The transfer service's plugin id (containerd 1.7 and 2.x; the same in config versions 2 and 3). */
export const TRANSFER_PLUGIN = 'io.containerd.transfer.v1.local';
/** CRI's plugin in a version 2 file (containerd 1.x; 2.x migrates it). */
export const CRI_V2_PLUGIN = 'io.containerd.grpc.v1.cri';
/** CRI's image plugin in a version 3 file (containerd 2.x). */
export const CRI_V3_IMAGES_PLUGIN = 'io.containerd.cri.v1.images';
/** The diff service's plugin id (its `default` lists the differs it asks, in order). */
export const DIFF_SERVICE_PLUGIN = 'io.containerd.service.v1.diff-service';

export interface ProxyPluginEntry {
  /** The snapshotter name containerd registers (`dedup` in `[proxy_plugins.dedup]`). */
  name: string;
  type?: string;
  address?: string;
  /** Its `exports` (string values only: containerd's map[string]string). */
  exports: Map<string, string>;
  /** 1-based line where the entry was first seen. */
  line: number;
  /** Defined (at least partly) by an inline table or dotted keys: not by a `[proxy_plugins.<name>]` header line an edit can extend. */
  inline: boolean;
  /** Its exports are set by an inline table or dotted keys (`exports = { … }`): a `[….exports]` header would define them twice. */
  exportsInline: boolean;
}

/** One entry of the transfer service's unpack_config list. */
export interface UnpackConfigEntry {
  snapshotter?: string;
  platform?: string;
  differ?: string;
  /** 1-based line of its `[[…]]` header, or of the inline array it is in. */
  line: number;
  /** In an inline array (`unpack_config = [{…}]`): not editable by line. */
  inline: boolean;
}

/** CRI's image snapshotter settings, in one of the two layouts. */
export interface CriImageFacts {
  /** 2: `[plugins."io.containerd.grpc.v1.cri".containerd]`; 3: `[plugins.'io.containerd.cri.v1.images']`. */
  layout: 2 | 3;
  snapshotter?: string;
  /** The line `snapshotter` is set on. */
  snapshotterLine?: number;
  disableSnapshotAnnotations?: boolean;
  /** Version 3 layout: `use_local_image_pull` (2.1+: CRI pulls without the transfer service). */
  useLocalImagePull?: boolean;
  /** Version 2 layout only: the containerd table has a `runtimes` table (containerd 2.x migrates its snapshotter settings only then). */
  hasRuntimes: boolean;
}

export interface ContainerdTomlFacts {
  plugins: Map<string, ProxyPluginEntry>;
  /** An explicit `[proxy_plugins]` header exists (a snippet must not repeat it). */
  hasProxyPluginsHeader: boolean;
  /** The file has a top-level `imports` key: other files may add proxy plugins too. */
  hasImports: boolean;
  /** Every `BinaryName = "…"` (a runc runtime's binary), with the table it is in. */
  runcBinaries: { table: string; value: string; line: number }[];
  /** The top-level `version` (2 or 3 for containerd's files), if set. */
  version?: number;
  /** The transfer service's unpack_config entries, in file order. */
  unpackConfig: UnpackConfigEntry[];
  /** The line of an inline `unpack_config = [ … ]` (even an empty one): `[[…]]` entries cannot be added next to it. */
  unpackInlineLine?: number;
  /** CRI's image settings in the version 2 layout and in the version 3 one (only those the file mentions). */
  cri: { v2?: CriImageFacts; v3?: CriImageFacts };
  /** The diff service's table (`plugins."io.containerd.service.v1.diff-service"`), if the file has one. */
  diffService?: DiffServiceFacts;
}

/** The diff service's settings: the differs it asks, in order. */
export interface DiffServiceFacts {
  /** 1-based line where the table was first seen (its header, or a dotted key). */
  line: number;
  /** By a `[…]` header line (an edit can add to it), not only dotted keys or an inline table. */
  header: boolean;
  /** Its `default` list (string items), and the line it is on. */
  default?: string[];
  defaultLine?: number;
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

export type TomlValue =
  | { kind: 'string'; value: string }
  | { kind: 'bool'; value: boolean }
  | { kind: 'int'; value: number }
  | { kind: 'table'; entries: [string[], TomlValue][] }
  | { kind: 'array'; items: TomlValue[] }
  | { kind: 'other' };

function parseValue(s: string): TomlValue {
  const v = s.trim();
  if (v.startsWith('"') || v.startsWith("'")) {
    const str = readString(v);
    return str ? { kind: 'string', value: str.value } : { kind: 'other' };
  }
  if (v === 'true' || v === 'false') return { kind: 'bool', value: v === 'true' };
  if (/^[+-]?[0-9](?:_?[0-9])*$/.test(v)) return { kind: 'int', value: Number(v.replace(/_/g, '')) };
  if (v.startsWith('[') && v.endsWith(']')) return { kind: 'array', items: splitTopLevel(v.slice(1, -1)).map(parseValue) };
  if (v.startsWith('{') && v.endsWith('}')) {
    const entries: [string[], TomlValue][] = [];
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

const same = (a: string[], b: string[]): boolean => a.length === b.length && a.every((x, i) => x === b[i]);
const UNPACK_PATH = ['plugins', TRANSFER_PLUGIN, 'unpack_config'];

export function readContainerdToml(text: string): ContainerdTomlFacts {
  const facts: ContainerdTomlFacts = { plugins: new Map(), hasProxyPluginsHeader: false, hasImports: false, runcBinaries: [], unpackConfig: [], cri: {} };
  /** The unpack_config element a `[[…unpack_config]]` header opened, while its keys follow. */
  let unpackEntry: UnpackConfigEntry | null = null;

  const entry = (name: string, line: number): ProxyPluginEntry => {
    let e = facts.plugins.get(name);
    if (!e) {
      e = { name, line, exports: new Map(), inline: false, exportsInline: false };
      facts.plugins.set(name, e);
    }
    return e;
  };
  const cri = (layout: 2 | 3): CriImageFacts => {
    const key = layout === 2 ? 'v2' : 'v3';
    facts.cri[key] ??= { layout, hasRuntimes: false };
    return facts.cri[key] as CriImageFacts;
  };
  /** A table (from a header or a key) at `full`: the ones that matter by their mere presence. */
  const sawTable = (full: string[], line: number, header = false): void => {
    if (full[0] === 'plugins' && full[1] === CRI_V2_PLUGIN && full[2] === 'containerd' && full[3] === 'runtimes') cri(2).hasRuntimes = true;
    if (full[0] === 'plugins' && full[1] === DIFF_SERVICE_PLUGIN) {
      facts.diffService ??= { line, header: false };
      if (header && full.length === 2) facts.diffService.header = true;
    }
  };
  const unpackFields = (e: UnpackConfigEntry, key: string, value: TomlValue): void => {
    if (value.kind !== 'string') return;
    if (key === 'snapshotter' || key === 'platform' || key === 'differ') e[key] = value.value;
  };
  /** `full`: the key's whole path; `headerLen`: how much of it the table header gave (a proxy plugin named by the key itself is inline or dotted). */
  const assign = (full: string[], value: TomlValue, line: number, headerLen: number): void => {
    sawTable(full, line);
    if (full.length === 3 && full[0] === 'plugins' && full[1] === DIFF_SERVICE_PLUGIN && full[2] === 'default' && value.kind === 'array') {
      const ds = facts.diffService as DiffServiceFacts;
      ds.default = value.items.filter((v) => v.kind === 'string').map((v) => (v as { value: string }).value);
      ds.defaultLine = line;
    }
    if (value.kind === 'table') {
      if (full[0] === 'proxy_plugins' && full.length === 2) entry(full[1], line).inline = true;
      for (const [k, v] of value.entries) assign([...full, ...k], v, line, headerLen);
      return;
    }
    if (same(full, UNPACK_PATH) && value.kind === 'array') {
      facts.unpackInlineLine ??= line;
      for (const item of value.items) {
        if (item.kind !== 'table') continue;
        const e: UnpackConfigEntry = { line, inline: true };
        for (const [k, v] of item.entries) if (k.length === 1) unpackFields(e, k[0], v);
        facts.unpackConfig.push(e);
      }
      return;
    }
    if (unpackEntry && full.length === 4 && same(full.slice(0, 3), UNPACK_PATH)) unpackFields(unpackEntry, full[3], value);
    if (full.length === 1 && full[0] === 'version' && value.kind === 'int') facts.version = value.value;
    if (full[0] === 'plugins' && full[1] === CRI_V2_PLUGIN && full[2] === 'containerd' && full.length === 4) criField(cri(2), full[3], value, line);
    if (full[0] === 'plugins' && full[1] === CRI_V3_IMAGES_PLUGIN && full.length === 3) criField(cri(3), full[2], value, line);
    if (full[full.length - 1] === 'BinaryName' && value.kind === 'string') {
      facts.runcBinaries.push({ table: full.slice(0, -1).map((k) => (/^[A-Za-z0-9_-]+$/.test(k) ? k : JSON.stringify(k))).join('.'), value: value.value, line });
    }
    if (full[0] !== 'proxy_plugins' || full.length < 3) return;
    const e = entry(full[1], line);
    if (headerLen < 2) e.inline = true;
    if (full[2] === 'exports' && headerLen < 3) e.exportsInline = true;
    if (value.kind !== 'string') return;
    if (full.length === 3 && full[2] === 'type') e.type = value.value;
    if (full.length === 3 && full[2] === 'address') e.address = value.value;
    if (full.length === 4 && full[2] === 'exports') e.exports.set(full[3], value.value);
  };

  scanToml(text, {
    header: (table, isArray, line) => {
      unpackEntry = null;
      if (isArray && same(table, UNPACK_PATH)) {
        unpackEntry = { line, inline: false };
        facts.unpackConfig.push(unpackEntry);
      }
      sawTable(table, line, !isArray);
      if (table.length === 1 && table[0] === 'proxy_plugins' && !isArray) facts.hasProxyPluginsHeader = true;
      if (table.length === 2 && table[0] === 'proxy_plugins') entry(table[1], line);
    },
    assign: (full, value, line, headerLen) => {
      if (headerLen === 0 && full.length === 1 && full[0] === 'imports') facts.hasImports = true;
      assign(full, value, line, headerLen);
    },
  });
  return facts;
}

export interface TomlVisitor {
  /** A `[table]` or `[[array of tables]]` header (an unparsable one gives ["(unparsed)"]). */
  header(table: string[], isArray: boolean, line: number): void;
  /** A `key = value` line: the key's whole path, its value, the 1-based line, how much of the path the header gave. */
  assign(full: string[], value: TomlValue, line: number, headerLen: number): void;
  /** A line this reader cannot take (left out when not given: containerd's config is read leniently). */
  error?(line: number, msg: string): void;
}

/** Reads `text` line by line, handing table headers and assignments to `visit` in file order. */
export function scanToml(text: string, visit: TomlVisitor): void {
  let table: string[] = [];
  let multiline: '"""' | "'''" | null = null;
  /** An array value spanning lines: its key, what has been read of it, where it began. */
  let pending: { key: string[] | null; text: string; line: number } | null = null;
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i];
    if (multiline) {
      if (raw.includes(multiline)) multiline = null;
      continue;
    }
    if (pending) {
      pending.text += ` ${stripComment(raw)}`;
      if (i === lines.length - 1 && bracketBalance(pending.text) > 0) visit.error?.(pending.line, 'the array is not closed');
      if (bracketBalance(pending.text) <= 0) {
        if (pending.key) visit.assign([...table, ...pending.key], parseValue(pending.text), pending.line, table.length);
        pending = null;
      }
      continue;
    }
    const line = stripComment(raw);
    if (line === '') continue;
    const header = /^\[\[(.*)\]\]$/.exec(line) ?? /^\[(.*)\]$/.exec(line);
    if (header) {
      const parsed = parseKey(header[1]);
      if (!parsed) visit.error?.(i + 1, `cannot read the table name in ${JSON.stringify(line)}`);
      table = parsed ?? ['(unparsed)'];
      visit.header(table, line.startsWith('[['), i + 1);
      continue;
    }
    const eq = indexOutsideQuotes(line, '=');
    if (eq < 0) {
      visit.error?.(i + 1, `expected a [table] or key = value, got ${JSON.stringify(line)}`);
      continue;
    }
    const key = parseKey(line.slice(0, eq));
    if (!key) visit.error?.(i + 1, `cannot read the key in ${JSON.stringify(line)}`);
    const rhs = line.slice(eq + 1).trim();
    for (const delim of ['"""', "'''"] as const) {
      // A multi-line string that does not close on this line: skip to its end.
      if (rhs.startsWith(delim) && !rhs.slice(3).includes(delim)) multiline = delim;
    }
    if (multiline) continue;
    if (rhs.startsWith('[') && bracketBalance(rhs) > 0) {
      // An array over several lines: read on to its end, then take it as one value.
      pending = { key, text: rhs, line: i + 1 };
      if (i === lines.length - 1) visit.error?.(i + 1, 'the array is not closed');
      continue;
    }
    if (!key) continue;
    visit.assign([...table, ...key], parseValue(rhs), i + 1, table.length);
  }
}

function criField(c: CriImageFacts, key: string, value: TomlValue, line: number): void {
  if (key === 'snapshotter' && value.kind === 'string') {
    c.snapshotter = value.value;
    c.snapshotterLine = line;
  }
  if (key === 'disable_snapshot_annotations' && value.kind === 'bool') c.disableSnapshotAnnotations = value.value;
  if (key === 'use_local_image_pull' && value.kind === 'bool') c.useLocalImagePull = value.value;
}

/** A TOML basic string of `s`. */
export function tomlString(s: string): string {
  return JSON.stringify(s);
}

/**
 * The lines to add to containerd's config for the proxy plugin `name` at
 * `address`; `exports`: with enable_remote_snapshot_annotations (what
 * containerd 2.x needs for lazy pulls; 1.x ignores it).
 */
export function proxyPluginSnippet(address: string, opts: { withHeader: boolean; name?: string; exports?: boolean } = { withHeader: true }): string {
  const name = opts.name ?? 'dedup';
  const lines = [`  [proxy_plugins.${name}]`, `    type = "snapshot"`, `    address = ${tomlString(address)}`];
  if (opts.exports) lines.push(`    [proxy_plugins.${name}.exports]`, `      enable_remote_snapshot_annotations = "true"`);
  return (opts.withHeader ? ['[proxy_plugins]', ...lines] : lines).join('\n');
}
