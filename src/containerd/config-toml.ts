import { goArch } from './image-layers';
import { type ContainerdTomlFacts, DIFF_SERVICE_PLUGIN, TRANSFER_PLUGIN, proxyPluginSnippet, readContainerdToml } from './toml-reader';

/**
 * What the snapshotter needs in containerd's config.toml, added and taken
 * out by line, leaving every other line as it was (no TOML rewrite: an
 * operator's comments and layout stay). Forms recognised: the tables
 * install.sh and the docs write,
 *
 *   [proxy_plugins]
 *     [proxy_plugins.dedup]            (or [proxy_plugins."dedup"])
 *       type = "snapshot"
 *       address = "/run/containerd/dedup-snapshotter.sock"
 *       [proxy_plugins.dedup.exports]
 *         enable_remote_snapshot_annotations = "true"
 *
 * and, for containerd 2.x (whose pulls go through the transfer service,
 * which unpacks only for the snapshotters it lists),
 *
 *   [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
 *     platform = "linux/amd64"
 *     snapshotter = "dedup"
 *     differ = "dedup-differ"
 *
 *   [proxy_plugins.dedup-differ]
 *     type = "diff"
 *     address = "/run/containerd/dedup-snapshotter.sock"
 *
 * (double-quoted in a version 2 file). Inline forms (`dedup = { ... }`,
 * `unpack_config = [ ... ]`) are reported, not edited.
 */

const SNAPSHOTTER = 'dedup';
/** The proxy differ the daemon serves on the same socket (a proxy plugin's name is unique across types, so not "dedup"). */
export const DIFFER = 'dedup-differ';
const DIFFER_HEADER = /^\s*\[\s*proxy_plugins\s*\.\s*(?:dedup-differ|"dedup-differ"|'dedup-differ')\s*(?:\.[^\]]*)?\]\s*(?:#.*)?$/;
const MARK_DIFFER = '# added by dedup-snapshotter install.sh: layers unpack in one pass through the daemon (containerd 2.x)';
const MARK_DIFF_SERVICE =
  "# added by dedup-snapshotter install.sh --diff-service: the diff service asks the daemon first (1.7: pulls unpack dedup's layers in one pass; commits of dedup containers); while the daemon is stopped, pulls through it fail";
/** The diff service's table header, in either quoting. */
const DIFF_SERVICE_HEADER = /^\s*\[\s*plugins\s*\.\s*(?:"io\.containerd\.service\.v1\.diff-service"|'io\.containerd\.service\.v1\.diff-service')\s*\]\s*(?:#.*)?$/;
/** `[proxy_plugins.dedup]` and its sub-tables (`.exports`): all of them are the plugin's. */
const HEADER = /^\s*\[\s*proxy_plugins\s*\.\s*(?:dedup|"dedup"|'dedup')\s*(?:\.[^\]]*)?\]\s*(?:#.*)?$/;
const PLUGIN_HEADER = /^\s*\[\s*proxy_plugins\s*\.\s*(?:dedup|"dedup"|'dedup')\s*\]\s*(?:#.*)?$/;
const EXPORTS_HEADER = /^\s*\[\s*proxy_plugins\s*\.\s*(?:dedup|"dedup"|'dedup')\s*\.\s*(?:exports|"exports"|'exports')\s*\]\s*(?:#.*)?$/;
const PARENT = /^\s*\[\s*proxy_plugins\s*\]\s*(?:#.*)?$/;
const ANY_HEADER = /^\s*\[/;
const MARK = '# added by dedup-snapshotter install.sh';
const MARK_RUNC = '# added by dedup-snapshotter install.sh: containers run through dedup-runc (KSM)';
const MARK_EXPORTS = '# added by dedup-snapshotter install.sh: pulls pass the remote-snapshot labels (containerd 2.x, lazy pulls)';
const MARK_UNPACK = '# added by dedup-snapshotter install.sh: the transfer service (containerd 2.x pulls) unpacks for dedup';
const MARK_UNPACK_DEFAULT = "# added by dedup-snapshotter install.sh: overlayfs, containerd's default, which a list without it leaves out";
/** The CRI runc runtime's table (containerd 1.x config; 2.x reads it from a version 2 file). */
const RUNC_HEADER = /^\s*\[\s*plugins\s*\.\s*"io\.containerd\.grpc\.v1\.cri"\s*\.\s*containerd\s*\.\s*runtimes\s*\.\s*(?:runc|"runc")\s*\]/;
const V3_RUNC_HEADER = /^\s*\[\s*plugins\s*\.\s*(?:"io\.containerd\.cri\.v1\.runtime"|'io\.containerd\.cri\.v1\.runtime')\s*\.\s*containerd\s*\.\s*runtimes\s*\.\s*(?:runc|"runc"|'runc')\s*\]/;
const ENABLE = 'enable_remote_snapshot_annotations';

export interface PluginEdit {
  text: string;
  /** Lines (1-based, of the input) taken out. */
  removed: number[];
  /** What is left that names the snapshotter and must be changed by hand (CRI's snapshotter = "dedup", an inline table). */
  leftovers: string[];
  /** What was left on purpose, and why (the overlayfs unpack_config entry). */
  notes: string[];
}

/** `containerd --version`'s output → its version, major and minor number (minor null when not given), or null. */
export function parseContainerdVersion(out: string): { version: string; major: number; minor: number | null } | null {
  // "containerd github.com/containerd/containerd/v2 v2.1.9 …", "containerd containerd.io 1.6.20 …": the first word that is a version.
  for (const word of out.trim().split(/\s+/).slice(1)) {
    const m = /^v?(([0-9]+)(?:\.([0-9]+))?(?:\.[0-9]+)*)/.exec(word);
    if (m) return { version: m[1], major: Number(m[2]), minor: m[3] === undefined ? null : Number(m[3]) };
  }
  return null;
}

/** Whether containerd `major`.`minor` takes proxy differs (`type = "diff"`): 1.7 and later; null when the version does not tell. */
export function hasProxyDiffers(major: number | null | undefined, minor: number | null | undefined): boolean | null {
  if (major === null || major === undefined) return null;
  if (major !== 1) return major > 1;
  return minor === null || minor === undefined ? null : minor >= 7;
}

/** containerd's platform name for this machine: linux/<GOARCH>. */
export function platformOf(arch: string = process.arch): string {
  return `linux/${goArch(arch)}`;
}

/** Whether `text` defines the proxy plugin, in any form (a table, a dotted or inline one): adding another would be invalid TOML. */
export function hasProxyPlugin(text: string): boolean {
  return readContainerdToml(text).plugins.has(SNAPSHOTTER);
}

/** The section to append: a dotted header is valid TOML whether or not [proxy_plugins] exists. */
export function proxyPluginSection(address: string): string {
  return `\n${MARK}\n[proxy_plugins.dedup]\n  type = "snapshot"\n  address = ${JSON.stringify(address)}\n${exportsTable('  ')}`;
}

/** The exports table (indented by `indent`): containerd 2.x's transfer service then passes the remote-snapshot labels; 1.x ignores it. */
function exportsTable(indent: string): string {
  return `${indent}[proxy_plugins.dedup.exports]\n${indent}  ${ENABLE} = "true"\n`;
}

/** The transfer plugin's table name in a version 3 file (containerd 2.x's own form) or a version 2 one. */
function transferTable(v3: boolean): string {
  return v3 ? `plugins.'${TRANSFER_PLUGIN}'` : `plugins."${TRANSFER_PLUGIN}"`;
}

/** One unpack_config entry (dedup's names the daemon's differ). */
function unpackEntry(v3: boolean, platform: string, sn: string): string {
  const differ = sn === SNAPSHOTTER ? `\n  differ = ${JSON.stringify(DIFFER)}` : '';
  return `[[${transferTable(v3)}.unpack_config]]\n  platform = ${JSON.stringify(platform)}\n  snapshotter = ${JSON.stringify(sn)}${differ}`;
}

/** unpack_config entries to append: one per snapshotter, each after its mark. */
export function unpackConfigSection(v3: boolean, platform: string, snapshotters: string[]): string {
  return snapshotters.map((sn) => `\n${sn === SNAPSHOTTER ? MARK_UNPACK : MARK_UNPACK_DEFAULT}\n${unpackEntry(v3, platform, sn)}\n`).join('');
}

/** The diff service's table in a version 3 file or a version 2 one. */
function diffServiceTable(v3: boolean): string {
  return v3 ? `plugins.'${DIFF_SERVICE_PLUGIN}'` : `plugins."${DIFF_SERVICE_PLUGIN}"`;
}

/** The diff service's table asking dedup-differ first, then containerd's walking differ (--diff-service). */
export function diffServiceSection(v3: boolean): string {
  return `\n${MARK_DIFF_SERVICE}\n[${diffServiceTable(v3)}]\n  default = [${JSON.stringify(DIFFER)}, "walking"]\n`;
}

/** The proxy differ's table (containerd 2.x): Apply of dedup's layers goes to the daemon's socket. */
export function differSection(address: string): string {
  return `\n${MARK_DIFFER}\n[proxy_plugins.${DIFFER}]\n  type = "diff"\n  address = ${JSON.stringify(address)}\n`;
}

/**
 * What containerd 2.x needs, for the doctor to show: the unpack_config
 * entries for `unpack` (this machine's platform), the proxy plugin with
 * its exports (`full`: with a [proxy_plugins] header, `table`: without,
 * `none`), and the proxy differ's table (`differ`).
 */
export function containerd2Snippet(address: string, opts: { v3: boolean; unpack: string[]; plugin: 'full' | 'table' | 'none'; differ?: boolean; platform?: string }): string {
  const platform = opts.platform ?? platformOf();
  const parts = opts.unpack.map((sn) => unpackEntry(opts.v3, platform, sn));
  if (opts.plugin !== 'none') parts.push(proxyPluginSnippet(address, { withHeader: opts.plugin === 'full', exports: true }));
  if (opts.differ) parts.push(differSection(address).replace(`${MARK_DIFFER}\n`, '').trim());
  return parts.join('\n\n');
}

/**
 * The runc runtime table that runs containers through `wrapper` (KSM), to
 * append when `text` has no runc runtime table of its own; null when it
 * has one (then only its options' BinaryName is to be set, by hand).
 */
export function runcWrapperSection(text: string, wrapper: string): string | null {
  if (text.split('\n').some((l) => RUNC_HEADER.test(l) || V3_RUNC_HEADER.test(l))) return null;
  // A version 3 file (containerd 2.x's own form) names the CRI runtime plugin differently.
  const v3 = /^\s*version\s*=\s*3\b/m.test(text);
  const t = v3 ? '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]' : '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]';
  return `\n${MARK_RUNC}\n${t}\n  runtime_type = "io.containerd.runc.v2"\n  ${t.replace(/\]$/, '.options]')}\n    BinaryName = ${JSON.stringify(wrapper)}\n`;
}

export interface AddOptions {
  address: string;
  /** dedup-runc's path: CRI's runc runtime through it (KSM), where the file has no runc table. */
  wrapper?: string | null;
  /** containerd's major version, when known (install.sh asks the binary): 2 and up needs the transfer service's unpack_config. */
  containerdMajor?: number | null;
  /** Its minor version, when known: 1.7 takes proxy differs, 1.6 does not. */
  containerdMinor?: number | null;
  /**
   * Also make the diff service ask dedup-differ first (`default =
   * ["dedup-differ", "walking"]`): on 1.7 pulls then unpack dedup's layers
   * in one pass, and commits of dedup containers go through it; every pull
   * through the diff service then fails while the daemon is stopped.
   */
  diffService?: boolean;
  /** linux/<GOARCH> for the unpack_config entries (default: this machine's). */
  platform?: string;
}

export interface AddResult {
  /** The new file, or null when nothing is to be added. */
  text: string | null;
  /** What was added, one phrase each. */
  added: string[];
  /** What is there already, or must be done by hand. */
  notes: string[];
}

/** Whether the file is for containerd 2.x: a version 3 file, or containerd ≥ 2 reading a version 2 one. */
export function wantsTransfer(facts: ContainerdTomlFacts, containerdMajor?: number | null): boolean {
  return facts.version === 3 || (containerdMajor ?? 0) >= 2;
}

/** A new config file for containerd `containerdMajor` (version 3 for 2.x, else version 2). */
export function newConfig(opts: AddOptions): AddResult {
  const v3 = (opts.containerdMajor ?? 0) >= 2;
  return addToConfig(`version = ${v3 ? 3 : 2}\n`, opts);
}

/**
 * `text` with what the snapshotter needs added (the proxy plugin with its
 * exports; for containerd 2.x the unpack_config entries; the runc wrapper),
 * by line: appended sections, and an exports table inserted right after an
 * existing `[proxy_plugins.dedup]` table. Nothing already there is repeated.
 */
export function addToConfig(text: string, opts: AddOptions): AddResult {
  const facts = readContainerdToml(text);
  const added: string[] = [];
  const notes: string[] = [];
  const lines = text.replace(/\n*$/, '').split('\n');
  let tail = '';
  const v3 = facts.version === 3;

  if (wantsTransfer(facts, opts.containerdMajor)) {
    const platform = opts.platform ?? platformOf();
    const ours = facts.unpackConfig.find((e) => e.snapshotter === SNAPSHOTTER);
    const listed = facts.unpackConfig.map((e) => e.snapshotter ?? '(none)').join(', ');
    if (ours) {
      notes.push(`already has an unpack_config entry for "${SNAPSHOTTER}" (line ${ours.line}, platform ${ours.platform ?? 'unset'})`);
      if (ours.differ === undefined && !ours.inline) {
        const indent = `${/^\s*/.exec(lines[ours.line - 1])?.[0] ?? ''}  `;
        lines.splice(ours.line, 0, `${indent}${MARK_DIFFER}`, `${indent}differ = ${JSON.stringify(DIFFER)}`);
        added.push(`differ = "${DIFFER}" to that entry (line ${ours.line + 2})`);
      } else if (ours.differ === undefined) {
        notes.push(`line ${ours.line}: add differ = "${DIFFER}" to the inline unpack_config entry for "${SNAPSHOTTER}" by hand (layers then unpack in one pass)`);
      } else if (ours.differ !== DIFFER) {
        notes.push(`its unpack_config entry for "${SNAPSHOTTER}" names differ = ${JSON.stringify(ours.differ)}: left so (with "${DIFFER}" layers unpack in one pass)`);
      }
    } else if (facts.unpackInlineLine !== undefined) {
      notes.push(
        `line ${facts.unpackInlineLine}: an inline unpack_config list, not edited: add { platform = ${JSON.stringify(platform)}, snapshotter = "${SNAPSHOTTER}" } to it by hand, or ctr image pull --snapshotter=${SNAPSHOTTER} fails with "no unpack platforms defined"`,
      );
    } else {
      // A list replaces containerd's default one (overlayfs): a new list must name it too.
      const sns = facts.unpackConfig.length === 0 ? [SNAPSHOTTER, 'overlayfs'] : [SNAPSHOTTER];
      tail += unpackConfigSection(v3, platform, sns);
      added.push(`the transfer service's unpack_config entr${sns.length > 1 ? 'ies' : 'y'} for ${sns.map((s) => `"${s}"`).join(' and ')} (${platform})`);
      if (sns.length === 1 && !facts.unpackConfig.some((e) => e.snapshotter === 'overlayfs')) {
        notes.push(`its unpack_config list (${listed}) has no overlayfs entry: left so (pulls with containerd's default snapshotter fail until one is added)`);
      }
    }
  }

  const plugin = facts.plugins.get(SNAPSHOTTER);
  if (!plugin) {
    tail += proxyPluginSection(opts.address);
    added.push(`[proxy_plugins.dedup] (address ${opts.address}, exporting ${ENABLE})`);
  } else {
    notes.push('already has [proxy_plugins.dedup]');
    const value = plugin.exports.get(ENABLE);
    if (value === 'true') {
      // Nothing to do.
    } else if (value !== undefined) {
      notes.push(`[proxy_plugins.dedup] exports ${ENABLE} = ${JSON.stringify(value)}: left so; set it to "true" by hand for lazy pulls on containerd 2.x`);
    } else if (plugin.inline) {
      notes.push(`line ${plugin.line}: [proxy_plugins.dedup] is an inline or dotted table, not edited: add exports = { ${ENABLE} = "true" } to it by hand`);
    } else if (plugin.exportsInline) {
      notes.push(`[proxy_plugins.dedup] (line ${plugin.line}) sets its exports inline, not edited: add ${ENABLE} = "true" to them by hand`);
    } else {
      const at = insertExports(lines);
      if (at) added.push(`${ENABLE} to [proxy_plugins.dedup]'s exports (line ${at})`);
    }
  }

  // The diff service's list (--diff-service), where containerd takes proxy differs.
  let diffService = false;
  if (opts.diffService) {
    const proxyDiffers = facts.version === 3 ? true : hasProxyDiffers(opts.containerdMajor, opts.containerdMinor);
    const ds = facts.diffService;
    if (proxyDiffers !== true) {
      notes.push(
        proxyDiffers === false
          ? `--diff-service: containerd ${opts.containerdMajor}.${opts.containerdMinor} has no proxy differs (1.7 and later have): the diff service's list is left as it is`
          : '--diff-service: cannot tell whether this containerd takes proxy differs (1.7 and later do; give --containerd-version): the diff service\'s list is left as it is',
      );
    } else if (ds?.default?.[0] === DIFFER) {
      notes.push(`the diff service already asks ${DIFFER} first (line ${ds.defaultLine})`);
      diffService = true;
    } else if (ds) {
      notes.push(
        `line ${ds.defaultLine ?? ds.line}: the diff service's settings are the file's own${ds.default ? ` (default = ${JSON.stringify(ds.default)})` : ''}: left so; for --diff-service set default = ["${DIFFER}", ${ds.default && ds.default.length > 0 ? ds.default.map((d) => JSON.stringify(d)).join(', ') : '"walking"'}] in it by hand`,
      );
    } else {
      tail += diffServiceSection(v3);
      added.push(`the diff service's list asking "${DIFFER}" first, then "walking"`);
      diffService = true;
    }
  }

  // The differ where dedup's unpack_config entry names (or will name) it, or the diff service's list does.
  const dedupEntry = facts.unpackConfig.find((e) => e.snapshotter === SNAPSHOTTER);
  if ((wantsTransfer(facts, opts.containerdMajor) && (dedupEntry !== undefined || facts.unpackInlineLine === undefined)) || diffService) {
    const differ = facts.plugins.get(DIFFER);
    if (!differ) {
      tail += differSection(opts.address);
      added.push(`[proxy_plugins.${DIFFER}] (type "diff", address ${opts.address})`);
    } else {
      notes.push(`already has [proxy_plugins.${DIFFER}]${differ.type !== 'diff' ? ` of type ${JSON.stringify(differ.type ?? 'unset')}: set type = "diff" by hand` : ''}`);
    }
  }

  if (opts.wrapper) {
    const runc = runcWrapperSection(text, opts.wrapper);
    if (runc) {
      tail += runc;
      added.push(`CRI's runc runtime through ${opts.wrapper} (KSM for containers)`);
    } else if (!text.includes(opts.wrapper)) {
      notes.push(`has its own runc runtime table: to make containers' memory mergeable, set BinaryName = ${JSON.stringify(opts.wrapper)} in its options (docs/configuration.md, KSM)`);
    }
  }
  if (added.length === 0) return { text: null, added, notes };
  return { text: `${lines.join('\n')}\n${tail}`, added, notes };
}

/**
 * Inserts the exports key into `lines` (in place): into an existing
 * `[proxy_plugins.dedup.exports]` table, else a new exports table right
 * after `[proxy_plugins.dedup]`'s last line. Returns the 1-based line of
 * what was inserted, or null when the plugin's header is not found.
 */
function insertExports(lines: string[]): number | null {
  const exp = lines.findIndex((l) => EXPORTS_HEADER.test(l));
  if (exp >= 0) {
    const indent = /^\s*/.exec(lines[exp])?.[0] ?? '';
    lines.splice(exp + 1, 0, `${indent}  ${MARK_EXPORTS}`, `${indent}  ${ENABLE} = "true"`);
    return exp + 3;
  }
  const h = lines.findIndex((l) => PLUGIN_HEADER.test(l));
  if (h < 0) return null;
  let end = h + 1;
  while (end < lines.length && !ANY_HEADER.test(lines[end])) end++;
  let last = end - 1;
  while (last > h && lines[last].trim() === '') last--;
  const indent = `${/^\s*/.exec(lines[h])?.[0] ?? ''}  `;
  lines.splice(last + 1, 0, `${indent}${MARK_EXPORTS}`, ...exportsTable(indent).replace(/\n$/, '').split('\n'));
  return last + 3;
}

/** Drops the table starting at line `i` (to its last non-blank line before the next header) and the mark (and one blank line) before it. */
function dropTable(lines: string[], i: number, marks: string[], drop: Set<number>): void {
  let end = i + 1;
  while (end < lines.length && !ANY_HEADER.test(lines[end])) end++;
  // Trailing blank lines stay with what follows.
  let last = end - 1;
  while (last > i && lines[last].trim() === '') last--;
  for (let j = i; j <= last; j++) drop.add(j);
  let k = i - 1;
  while (k >= 0 && marks.includes(lines[k].trim())) drop.add(k--);
  if (k >= 0 && lines[k].trim() === '') drop.add(k);
}

/**
 * Takes out of `text` what add put there: the proxy plugin's tables (and a
 * [proxy_plugins] table left empty), the unpack_config entry for dedup, the
 * runc runtime table with install.sh's mark, and their marks. The overlayfs
 * unpack_config entry install.sh added goes only when no other entry would
 * be left (then containerd's default list, which has overlayfs, applies as
 * before); any other overlayfs entry stays, said in `notes`.
 */
export function removeProxyPlugin(text: string): PluginEdit {
  const lines = text.split('\n');
  const facts = readContainerdToml(text);
  const drop = new Set<number>();
  const notes: string[] = [];
  for (let i = 0; i < lines.length; i++) {
    if (HEADER.test(lines[i])) dropTable(lines, i, [MARK, MARK_EXPORTS], drop);
    if (DIFFER_HEADER.test(lines[i])) dropTable(lines, i, [MARK_DIFFER], drop);
    // The diff service's table only when install.sh wrote it (its mark right above).
    if (DIFF_SERVICE_HEADER.test(lines[i]) && i > 0 && lines[i - 1].trim() === MARK_DIFF_SERVICE) dropTable(lines, i, [MARK_DIFF_SERVICE], drop);
  }
  // The unpack_config entries: dedup's (any, by a [[…]] header), overlayfs's when it is install.sh's and would be alone.
  const tables = facts.unpackConfig.filter((e) => !e.inline);
  const ours = tables.filter((e) => e.snapshotter === SNAPSHOTTER);
  const remaining = facts.unpackConfig.filter((e) => !ours.includes(e));
  for (const e of ours) dropTable(lines, e.line - 1, [MARK_UNPACK], drop);
  for (const e of remaining.filter((x) => x.snapshotter === 'overlayfs')) {
    const marked = !e.inline && e.line >= 2 && lines[e.line - 2].trim() === MARK_UNPACK_DEFAULT;
    if (marked && remaining.length === 1 && ours.length > 0) {
      dropTable(lines, e.line - 1, [MARK_UNPACK_DEFAULT], drop);
    } else if (ours.length > 0) {
      notes.push(
        `line ${e.line}: the unpack_config entry for overlayfs stays (containerd's default snapshotter; ${marked ? 'other entries are listed too, and a list without it leaves overlayfs out' : 'not added by install.sh'})`,
      );
    }
  }
  // The runc runtime table install.sh added (its mark, the table and its options table).
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].trim() !== MARK_RUNC) continue;
    let end = i + 1;
    let tables = 0;
    while (end < lines.length && (!ANY_HEADER.test(lines[end]) || tables < 2)) {
      if (ANY_HEADER.test(lines[end])) tables++;
      end++;
    }
    let last = end - 1;
    while (last > i && lines[last].trim() === '') last--;
    for (let j = i; j <= last; j++) drop.add(j);
    if (i > 0 && lines[i - 1].trim() === '') drop.add(i - 1);
  }
  // A [proxy_plugins] table with nothing left in it goes too.
  for (let i = 0; i < lines.length; i++) {
    if (!PARENT.test(lines[i]) || drop.has(i)) continue;
    let j = i + 1;
    let empty = true;
    while (j < lines.length && (drop.has(j) || !ANY_HEADER.test(lines[j]))) {
      if (!drop.has(j) && lines[j].trim() !== '' && !lines[j].trim().startsWith('#')) empty = false;
      j++;
    }
    const next = j < lines.length ? lines[j] : '';
    // Followed by a sub-table of its own that stays ([proxy_plugins.other]): not empty.
    if (/^\s*\[\s*proxy_plugins\s*\./.test(next)) empty = false;
    if (empty) {
      const touched = [...drop].some((d) => d > i && d < j);
      if (touched) drop.add(i);
    }
  }
  const leftovers: string[] = [];
  const criLines = new Set([facts.cri.v2, facts.cri.v3].filter((c) => c?.snapshotter === SNAPSHOTTER).map((c) => (c?.snapshotterLine ?? 0) - 1));
  for (const e of facts.unpackConfig.filter((x) => x.inline && x.snapshotter === SNAPSHOTTER)) {
    leftovers.push(`line ${e.line}: an inline unpack_config list with an entry for "${SNAPSHOTTER}" (remove that entry by hand)`);
  }
  const ds = facts.diffService;
  if (ds?.default?.includes(DIFFER) && !drop.has((ds.defaultLine ?? 0) - 1)) {
    leftovers.push(`line ${ds.defaultLine}: the diff service's list names "${DIFFER}" (take it out by hand: once its table is gone containerd's diff service cannot start)`);
  }
  lines.forEach((l, i) => {
    if (drop.has(i)) return;
    if (criLines.has(i)) leftovers.push(`line ${i + 1}: ${l.trim()} (CRI uses the dedup snapshotter: set it back, e.g. to "overlayfs")`);
    if (/^\s*(?:proxy_plugins\s*\.\s*)?(?:dedup|"dedup"|'dedup')\s*=\s*\{/.test(l)) leftovers.push(`line ${i + 1}: ${l.trim()} (an inline proxy plugin table: remove it by hand)`);
    if (/dedup-runc/.test(l)) leftovers.push(`line ${i + 1}: ${l.trim()} (containers would fail to start once dedup-runc is gone: remove the line, runc is then used)`);
  });
  const kept = lines.filter((_, i) => !drop.has(i));
  return { text: kept.join('\n'), removed: [...drop].sort((a, b) => a - b).map((i) => i + 1), leftovers, notes };
}
