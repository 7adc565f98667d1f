import fs from 'node:fs';
import path from 'node:path';
import { loadConfig } from '../config/config';
import { readImageDeviceTags } from '../convert/erofs-format';
import { SystemKernel } from '../mount/layer-kernel';
import { storeDevicePath } from '../store/chunkstore';
import { readLayerFacts } from '../store/readonly';
import { RootLayout } from '../store/root-layout';

const USAGE = `usage: dedup-snapshotter mount LAYER DIR

Mounts a converted layer's EROFS image read-only on DIR together with the
chunk store it reads its file data from (the guide's
"mount -t erofs -o loop,ro ROOT/images/<id>.erofs DIR" lists the files
but fails every read with EIO: the image holds only metadata). LAYER is
ROOT/images/<id>.erofs or <id>. Unmount with: umount DIR.
ROOT comes from the environment or CONFIG, as for the daemon.
`;

/** The store files a layer image names as its devices (store/chunks.blob, store/segments/<id>.blob), in its device table's order. */
function storeDevices(root: string, image: string): string[] {
  return readImageDeviceTags(image).map((t) => storeDevicePath(path.join(root, 'store'), t));
}

export async function runMountLayer(args: string[]): Promise<number> {
  if (args.includes('--help') || args.includes('-h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (args.length !== 2) {
    process.stderr.write(USAGE);
    return 2;
  }
  const [layerArg, dir] = args;
  const layout = new RootLayout(loadConfig().root);
  let id: number;
  if (/^[1-9][0-9]{0,15}$/.test(layerArg)) id = Number(layerArg);
  else {
    const m = /^([1-9][0-9]{0,15})\.erofs$/.exec(path.basename(layerArg));
    if (!m || path.resolve(path.dirname(layerArg)) !== path.resolve(layout.imagesDir)) {
      process.stderr.write(`dedup-snapshotter mount: ${JSON.stringify(layerArg)} is not a layer image of ROOT ${layout.root} (expected ${layout.imagesDir}/<id>.erofs or <id>)\n`);
      return 2;
    }
    id = Number(m[1]);
  }
  const facts = fs.existsSync(layout.metadataDb) ? readLayerFacts(layout.metadataDb, id) : null;
  if (!facts) {
    process.stderr.write(`dedup-snapshotter mount: ROOT ${layout.root} has no layer ${id} (ls ${layout.imagesDir})\n`);
    return 1;
  }
  if (facts.lazy) {
    // Its data file has holes where chunks are not fetched yet: mounted by
    // hand, those would read as zeros. The daemon's mount waits for them.
    process.stderr.write(`dedup-snapshotter mount: layer ${id} loads its data on demand (lazy/${id}.erofs); mounted by hand its missing data would read as zeros. Its files are at ${layout.mnt(String(id))} (the daemon's own mount)\n`);
    return 1;
  }
  if (facts.quarantined) {
    process.stderr.write(`dedup-snapshotter mount: warning: layer ${id} is quarantined (${facts.quarantined}): some of its files may read wrong bytes or fail; dedup-snapshotter fsck says what to do\n`);
  }
  const image = layout.image(String(id));
  const kernel = new SystemKernel(path.join(layout.root, 'store', 'chunks.blob'), { devicesOf: (img) => storeDevices(layout.root, img) });
  try {
    if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new Error(`${dir} is not a directory (mkdir -p ${dir})`);
    if (kernel.mountPoints().includes(path.resolve(dir))) throw new Error(`something is mounted on ${path.resolve(dir)} already (umount ${path.resolve(dir)})`);
    kernel.mountImage(image, path.resolve(dir), facts.hasBlob);
  } catch (err) {
    process.stderr.write(`dedup-snapshotter mount: ${(err as Error).message}\n`);
    return 1;
  }
  const devices = facts.hasBlob ? storeDevices(layout.root, image) : [];
  process.stdout.write(`mounted layer ${id} (${image}${devices.length > 0 ? ` with ${devices.join(', ')}` : ''}) read-only on ${path.resolve(dir)}; unmount with: umount ${path.resolve(dir)}\n`);
  return 0;
}
