import { readContainerdToml } from './toml-reader';

/**
 * The proxy plugin's section in containerd's config.toml, added and taken
 * out by line, leaving every other line as it was (no TOML rewrite: an
 * operator's comments and layout stay). Forms recognised: the tables
 * install.sh and the docs write,
 *
 *   [proxy_plugins]
 *     [proxy_plugins.dedup]            (or [proxy_plugins."dedup"])
 *       type = "snapshot"
 *       address = "/run/containerd/dedup-snapshotter.sock"
 *
 * A `dedup = { ... }` inline table is reported, not edited.
 */

const HEADER = /^\s*\[\s*proxy_plugins\s*\.\s*(?:dedup|"dedup")\s*\]\s*(?:#.*)?$/;
const PARENT = /^\s*\[\s*proxy_plugins\s*\]\s*(?:#.*)?$/;
const ANY_HEADER = /^\s*\[/;
const MARK = '# added by dedup-snapshotter install.sh';
const MARK_RUNC = '# added by dedup-snapshotter install.sh: containers run through dedup-runc (KSM)';
/** The CRI runc runtime's table (containerd 1.x config; 2.x reads it from a version 2 file). */
const RUNC_HEADER = /^\s*\[\s*plugins\s*\.\s*"io\.containerd\.grpc\.v1\.cri"\s*\.\s*containerd\s*\.\s*runtimes\s*\.\s*(?:runc|"runc")\s*\]/;
const V3_RUNC_HEADER = /^\s*\[\s*plugins\s*\.\s*"io\.containerd\.cri\.v1\.runtime"\s*\.\s*containerd\s*\.\s*runtimes\s*\.\s*(?:runc|"runc")\s*\]/;

export interface PluginEdit {
  text: string;
  /** Lines (1-based, of the input) taken out. */
  removed: number[];
  /** What is left that names the snapshotter and must be changed by hand (CRI's snapshotter = "dedup", an inline table). */
  leftovers: string[];
}

/** Whether `text` defines the proxy plugin, in any form (a table, a dotted or inline one): adding another would be invalid TOML. */
export function hasProxyPlugin(text: string): boolean {
  return readContainerdToml(text).plugins.has('dedup');
}

/** The section to append: a dotted header is valid TOML whether or not [proxy_plugins] exists. */
export function proxyPluginSection(address: string): string {
  return `\n${MARK}\n[proxy_plugins.dedup]\n  type = "snapshot"\n  address = ${JSON.stringify(address)}\n`;
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

/** Takes the proxy plugin's table out of `text` (and a [proxy_plugins] table left empty, and install.sh's comment). */
export function removeProxyPlugin(text: string): PluginEdit {
  const lines = text.split('\n');
  const drop = new Set<number>();
  for (let i = 0; i < lines.length; i++) {
    if (!HEADER.test(lines[i])) continue;
    let end = i + 1;
    while (end < lines.length && !ANY_HEADER.test(lines[end])) end++;
    // Trailing blank lines stay with what follows.
    let last = end - 1;
    while (last > i && lines[last].trim() === '') last--;
    for (let j = i; j <= last; j++) drop.add(j);
    let k = i - 1;
    if (k >= 0 && lines[k].trim() === MARK) drop.add(k--);
    if (k >= 0 && lines[k].trim() === '' && (drop.has(k + 1) || drop.has(i))) drop.add(k);
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
  lines.forEach((l, i) => {
    if (drop.has(i)) return;
    if (/^\s*snapshotter\s*=\s*"dedup"/.test(l)) leftovers.push(`line ${i + 1}: ${l.trim()} (CRI uses the dedup snapshotter: set it back, e.g. to "overlayfs")`);
    if (/^\s*(?:proxy_plugins\s*\.\s*)?(?:dedup|"dedup")\s*=\s*\{/.test(l)) leftovers.push(`line ${i + 1}: ${l.trim()} (an inline proxy plugin table: remove it by hand)`);
    if (/dedup-runc/.test(l)) leftovers.push(`line ${i + 1}: ${l.trim()} (containers would fail to start once dedup-runc is gone: remove the line, runc is then used)`);
  });
  const kept = lines.filter((_, i) => !drop.has(i));
  return { text: kept.join('\n'), removed: [...drop].sort((a, b) => a - b).map((i) => i + 1), leftovers };
}
