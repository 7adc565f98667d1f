import fs from 'node:fs';
import { ContainerdClient } from '../containerd/client';
import { imageChainIds } from '../containerd/image-layers';
import { loadConfig } from '../config/config';
import { splitKey } from '../store/keys';
import { readCommittedKeys } from '../store/readonly';
import { RootLayout } from '../store/root-layout';

const USAGE = `usage: dedup-snapshotter images [--json] [--containerd SOCKET]

Lists containerd's images whose layers this snapshotter holds (unpacked
with --snapshotter=dedup, or pulled through CRI with it), by namespace:
what stops working when the snapshotter goes (uninstall.sh prints it).
Reads ROOT/metadata.db read-only and asks containerd (SOCKET: default
$CONTAINERD_ADDRESS or /run/containerd/containerd.sock).
`;

export interface ImageUse {
  namespace: string;
  image: string;
}

/** A committed snapshot named by a bare chain id: a remote layer, made under the name containerd's `snapshot.ref` label gave, which carries no namespace. */
const BARE_CHAIN_ID = /^sha256:[0-9a-f]{64}$/;

/**
 * Images whose top layer is one of the committed snapshots `keys` name:
 * in the namespace of a `<ns>/<n>/<chain id>` key, and for a remote layer's
 * bare chain id in whichever namespace has such an image (all are asked).
 */
export async function imagesUsing(keys: string[], socket: string): Promise<ImageUse[]> {
  const byNs = new Map<string, Set<string>>();
  const anyNs = new Set<string>();
  for (const key of keys) {
    const k = splitKey(key);
    if (!k) {
      if (BARE_CHAIN_ID.test(key)) anyNs.add(key);
      continue;
    }
    let set = byNs.get(k.ns);
    if (!set) byNs.set(k.ns, (set = new Set()));
    set.add(k.name);
  }
  if (anyNs.size > 0) {
    const c = new ContainerdClient(socket, 'default', 30_000);
    try {
      for (const ns of await c.listNamespaces()) if (!byNs.has(ns)) byNs.set(ns, new Set());
    } finally {
      c.close();
    }
  }
  const out: ImageUse[] = [];
  for (const [ns, chains] of [...byNs].sort(([a], [b]) => a.localeCompare(b))) {
    const c = new ContainerdClient(socket, ns, 30_000);
    try {
      for (const name of (await c.listImages()).sort()) {
        let ids: string[];
        try {
          ids = await imageChainIds(c, name);
        } catch {
          continue; // not for this platform, or its content is gone: not unpacked here
        }
        const top = ids.at(-1);
        if (top !== undefined && (chains.has(top) || anyNs.has(top))) out.push({ namespace: ns, image: name });
      }
    } finally {
      c.close();
    }
  }
  return out;
}

export async function runImages(args: string[]): Promise<number> {
  let json = false;
  let socket = process.env.CONTAINERD_ADDRESS || '/run/containerd/containerd.sock';
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--json') json = true;
    else if (a === '--containerd' && args[i + 1]) socket = args[++i];
    else if (a === '--help' || a === '-h') {
      process.stdout.write(USAGE);
      return 0;
    } else {
      process.stderr.write(`dedup-snapshotter images: unknown argument ${JSON.stringify(a)}\n${USAGE}`);
      return 2;
    }
  }
  const layout = new RootLayout(loadConfig().root);
  const keys = fs.existsSync(layout.metadataDb) ? readCommittedKeys(layout.metadataDb) : [];
  let uses: ImageUse[];
  try {
    uses = keys.length === 0 ? [] : await imagesUsing(keys, socket);
  } catch (err) {
    process.stderr.write(`dedup-snapshotter images: cannot ask containerd on ${socket}: ${(err as Error).message}\n`);
    return 1;
  }
  if (json) process.stdout.write(`${JSON.stringify(uses)}\n`);
  else for (const u of uses) process.stdout.write(`${u.namespace}\t${u.image}\n`);
  return 0;
}
