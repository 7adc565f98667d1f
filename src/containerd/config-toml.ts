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

export interface PluginEdit {
  text: string;
  /** Lines (1-based, of the input) taken out. */
  removed: number[];
  /** What is left that names the snapshotter and must be changed by hand (CRI's snapshotter = "dedup", an inline table). */
  leftovers: string[];
}

/** Whether `text` has the proxy plugin's table. */
export function hasProxyPlugin(text: string): boolean {
  return text.split('\n').some((l) => HEADER.test(l));
}

/** The section to append: a dotted header is valid TOML whether or not [proxy_plugins] exists. */
export function proxyPluginSection(address: string): string {
  return `\n${MARK}\n[proxy_plugins.dedup]\n  type = "snapshot"\n  address = ${JSON.stringify(address)}\n`;
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
  });
  const kept = lines.filter((_, i) => !drop.has(i));
  return { text: kept.join('\n'), removed: [...drop].sort((a, b) => a - b).map((i) => i + 1), leftovers };
}
