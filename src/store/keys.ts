/**
 * containerd's keys of a proxy snapshotter's snapshots: its metadata layer
 * writes them as `<namespace>/<txid>/<name>` (`name`: the key or chain id
 * `ctr snapshots ls` shows). A proxy gets no namespace header, so the key is
 * where the namespace is read from.
 */

/** A containerd namespace (its own rule: labels joined by '.', '_' or '-'). */
export const NAMESPACE_RE = /^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$/;

/** `<namespace>/<txid>/<name>` split, or null for a key of another form (tests, direct callers). */
export function splitKey(key: string): { ns: string; name: string } | null {
  const m = /^([^/]+)\/[0-9]+\/(.+)$/.exec(key);
  return m ? { ns: m[1], name: m[2] } : null;
}
