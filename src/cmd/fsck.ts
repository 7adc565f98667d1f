import http from 'node:http';
import { apiTarget, configuredApiAddress } from './api-address';
import { ContainerdClient } from '../containerd/client';
import type { IntegrityReport, LayerProblem } from '../layers/integrity';
import { splitKey } from '../store/keys';

const USAGE = `usage: dedup-snapshotter fsck [--json] [--drop-broken] [--address HOST:PORT|SOCKET] [--containerd SOCK]

Asks the running daemon to read back every chunk of its store and every layer
image and check them against their digests (progress on stderr). Layers whose
data is lost or damaged are quarantined (never served) and listed with the
images that use them and the commands that put them right; layers whose data
is good again are served again. Exit status 0: nothing is damaged; 1: something
is (see the list); 2: fsck could not run.

--drop-broken  also removes, through containerd (--containerd, default
               /run/containerd/containerd.sock), the committed snapshots of
               each quarantined layer and of the layers stacked on it, so that
               pulling the image again unpacks it anew. Snapshots of
               containers (active or view) are never removed: stop and remove
               those containers first.
`;

interface Line {
  progress?: { checked: number; total: number; bytes: number; bad: number };
  report?: IntegrityReport;
  error?: string;
}

function post(address: string, url: string, onLine: (l: Line) => void): Promise<number> {
  const target = apiTarget(address);
  return new Promise((resolve, reject) => {
    const req = http.request({ ...target, method: 'POST', path: url }, (res) => {
      let buf = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        buf += d;
        for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
          const text = buf.slice(0, i);
          buf = buf.slice(i + 1);
          if (text.trim() !== '') onLine(JSON.parse(text) as Line);
        }
      });
      res.on('end', () => {
        if (buf.trim() !== '') onLine(JSON.parse(buf) as Line);
        resolve(res.statusCode ?? 0);
      });
    });
    req.on('error', reject);
    req.end();
  });
}

const mib = (n: number) => `${(n / 1048576).toFixed(1)} MiB`;

/** containerd's namespace and snapshot name of one of our keys (`<ns>/<seq>/<name>`). */
/** What to run for one quarantined layer. */
export function remedy(p: LayerProblem): string[] {
  const k = splitKey(p.key);
  const out: string[] = [];
  const containers = p.stack.filter((s) => s.kind !== 'committed');
  if (containers.length > 0) out.push(`stop and remove the containers whose snapshots are stacked on it: ${containers.map((c) => splitKey(c.key)?.name ?? c.key).join(', ')}`);
  if (p.images.length > 0) {
    for (const ref of p.images) out.push(`crictl rmi ${ref}  (or: ctr -n ${k?.ns ?? 'k8s.io'} images rm --sync ${ref}), then pull it again`);
  } else if (k) {
    const names = p.stack.filter((s) => s.kind === 'committed').map((s) => splitKey(s.key)?.name ?? s.key);
    out.push(`ctr -n ${k.ns} snapshots --snapshotter dedup rm ${names.join(' ')}  (or dedup-snapshotter fsck --drop-broken), then pull the images that use it again (ctr image pull --snapshotter=dedup REF)`);
  }
  return out;
}

export function formatReport(r: IntegrityReport): string {
  const lines: string[] = [];
  if (r.verified) lines.push(`verified ${r.verified.checked} chunks (${mib(r.verified.bytes)}): ${r.verified.bad} bad`);
  if (r.store) lines.push(`chunk store: ${r.store}`);
  if (r.repaired > 0) lines.push(`fetched again from registries and written back: ${r.repaired} chunks`);
  for (const u of r.unrepaired) lines.push(`not repairable: ${u}`);
  if (r.released.length > 0) lines.push(`served again (their data is good again): layers ${r.released.join(', ')}`);
  if (r.quarantined.length === 0) {
    lines.push('every layer is served: nothing is damaged');
    return `${lines.join('\n')}\n`;
  }
  lines.push(`${r.quarantined.length} layers are quarantined (not served; containers on them cannot start):`);
  for (const p of r.quarantined) {
    lines.push(`  layer ${p.layer} (snapshot ${p.key}): ${p.reason}`);
    if (p.images.length > 0) lines.push(`    images: ${p.images.join(', ')}`);
    for (const f of remedy(p)) lines.push(`    fix: ${f}`);
  }
  return `${lines.join('\n')}\n`;
}

/**
 * Removes through containerd the committed snapshots of each quarantined
 * layer and of those stacked on it (leaves first), then has containerd
 * collect garbage at once: its metadata forgets a snapshot at once but the
 * snapshotter's copy goes at the next collection, and a pull in between
 * would find the damaged layer still there and use it again.
 */
async function dropBroken(r: IntegrityReport, socket: string, say: (s: string) => void): Promise<number> {
  let failed = 0;
  let removed = 0;
  const clients = new Map<string, ContainerdClient>();
  for (const p of r.quarantined) {
    if (p.stack.some((s) => s.kind !== 'committed')) {
      say(`layer ${p.layer}: not dropped: containers use snapshots stacked on it (stop and remove them first)`);
      failed++;
      continue;
    }
    for (const s of p.stack) {
      const k = splitKey(s.key);
      if (!k) continue;
      let c = clients.get(k.ns);
      if (!c) clients.set(k.ns, (c = new ContainerdClient(socket, k.ns, 30_000)));
      try {
        await c.removeSnapshot('dedup', k.name);
        say(`removed snapshot ${k.name} (namespace ${k.ns})`);
        removed++;
      } catch (err) {
        if (/NOT_FOUND|not found/i.test((err as Error).message)) continue;
        say(`cannot remove snapshot ${k.name} (namespace ${k.ns}): ${(err as Error).message}`);
        failed++;
        break;
      }
    }
  }
  const any = clients.values().next().value as ContainerdClient | undefined;
  if (any && removed > 0) {
    try {
      await any.collectGarbage();
      say('containerd collected garbage: the dropped layers are gone from the daemon');
    } catch (err) {
      say(`containerd could not collect garbage now (${(err as Error).message}): it removes the dropped layers on its own shortly; wait for that before pulling again`);
      failed++;
    }
  }
  for (const c of clients.values()) c.close();
  return failed;
}

export async function runFsck(args: string[]): Promise<number> {
  let json = false;
  let drop = false;
  let address: string | null = null;
  let containerd = '/run/containerd/containerd.sock';
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--json') json = true;
    else if (a === '--drop-broken') drop = true;
    else if (a === '--address' && i + 1 < args.length) address = args[++i];
    else if (a === '--containerd' && i + 1 < args.length) containerd = args[++i];
    else if (a === '--help' || a === '-h') {
      process.stdout.write(USAGE);
      return 0;
    } else {
      process.stderr.write(`dedup-snapshotter fsck: unknown argument ${JSON.stringify(a)}\n${USAGE}`);
      return 2;
    }
  }
  if (!address) address = configuredApiAddress('fsck');
  if (!address) return 2;
  let report: IntegrityReport | null = null;
  let error: string | null = null;
  let status: number;
  try {
    status = await post(address, '/fsck', (l) => {
      if (l.progress) process.stderr.write(`fsck: verified ${l.progress.checked} of ${l.progress.total} chunks (${mib(l.progress.bytes)}), ${l.progress.bad} bad\n`);
      if (l.report) report = l.report;
      if (l.error) error = l.error;
    });
  } catch (err) {
    process.stderr.write(`dedup-snapshotter fsck: cannot reach the daemon's API at ${address}: ${(err as Error).message} (fsck runs inside the daemon: start it, e.g. systemctl start dedup-snapshotter)\n`);
    return 2;
  }
  if (!report) {
    process.stderr.write(`dedup-snapshotter fsck: ${error ?? `the daemon answered HTTP ${status} without a report`}\n`);
    return 2;
  }
  const r = report as IntegrityReport;
  process.stdout.write(json ? `${JSON.stringify(r, null, 2)}\n` : formatReport(r));
  if (drop && r.quarantined.length > 0) {
    const failed = await dropBroken(r, containerd, (s) => process.stdout.write(`${s}\n`));
    return failed > 0 ? 1 : 0;
  }
  return r.quarantined.length > 0 || r.store ? 1 : 0;
}
