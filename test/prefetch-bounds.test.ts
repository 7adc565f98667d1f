/**
 * Issue 12, item 5: a prefetch flood must not grow the daemon without bound.
 * Measured before: 300 POST /prefetch of 70,000 paths each (840 KB, under
 * the 1 MiB body limit), each answered 202, grew the daemon to 4.3 GB and
 * it died (JavaScript heap out of memory). Now the queue has limits (jobs,
 * entries, bytes) and answers 429 with Retry-After beyond them, finished
 * jobs keep only their figures, and the daemon serves on once it drained.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { PrefetchError, Prefetcher, entryBytes } from '../src/ondemand/prefetch';
import { type DaemonProcess, call, cleanupDaemons, snapshotsClient, startDaemon, tempDir, waitFor } from './helpers/daemon';
import { request } from './helpers/http';

after(() => cleanupDaemons());

/** A layer root with a few files, for an in-process Prefetcher. */
function layerRoot(): string {
  const root = tempDir('prefetch-bounds');
  fs.mkdirSync(path.join(root, 'etc'));
  fs.writeFileSync(path.join(root, 'etc', 'a.txt'), 'a\n');
  fs.writeFileSync(path.join(root, 'etc', 'b.txt'), 'b\n');
  return root;
}

async function refused(p: Promise<unknown>, status: number, pattern: RegExp): Promise<PrefetchError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof PrefetchError, String(err));
    assert.equal(err.status, status, err.message);
    assert.match(err.message, pattern);
    return err;
  }
  assert.fail(`expected ${status}`);
}

describe('Prefetcher limits', () => {
  test('jobs, entries and bytes beyond the limits are refused (429 with a retry time; 413 for a job that can never fit); drained, it accepts again', async () => {
    const root = layerRoot();
    const gate: { open: () => void } = { open: () => undefined };
    const opened = new Promise<void>((r) => (gate.open = r));
    let resolves = 0;
    const p = new Prefetcher({
      resolve: () => {
        resolves++;
        return [{ id: '1', root }];
      },
      traceDir: root,
      concurrency: 1,
      limits: { maxJobs: 3, maxEntries: 10, maxBytes: 1 << 20, keepFinished: 2 },
    });
    // Hold the running job: its reads wait until the gate opens.
    const origWarm = (p as any).warm.bind(p);
    (p as any).warm = async (...args: unknown[]) => {
      await opened;
      return origWarm(...args);
    };
    const a = await p.submit({ imageId: 'x', files: ['etc/a.txt', 'etc/b.txt', 'etc/missing'] });
    assert.equal(a.entries, 3);
    await p.submit({ imageId: 'x', files: ['etc/a.txt', 'etc/b.txt'] });
    assert.deepEqual({ jobs: p.queued.jobs, entries: p.queued.entries }, { jobs: 2, entries: 5 });
    // Entries: 5 queued + 6 > 10.
    const e = await refused(p.submit({ imageId: 'x', files: Array.from({ length: 6 }, (_, i) => `etc/f${i}`) }), 429, /max_queued_entries \(10\); retry later/);
    assert.ok(e.retryAfter !== undefined && e.retryAfter >= 1 && e.retryAfter <= 60, `retryAfter ${e.retryAfter}`);
    // One that could never fit.
    await refused(p.submit({ imageId: 'x', files: Array.from({ length: 11 }, (_, i) => `etc/f${i}`) }), 413, /over prefetch.max_queued_entries \(10\); split the request/);
    await p.submit({ imageId: 'x', files: ['etc/a.txt'] });
    // Jobs: 3 waiting or running.
    const resolvesBefore = resolves;
    await refused(p.submit({ imageId: 'x', files: ['etc/a.txt'] }), 429, /3 jobs waiting or running \(prefetch.max_queued_jobs 3\)/);
    assert.equal(resolves, resolvesBefore, 'a refused request is refused before any work');
    gate.open();
    await waitFor(() => p.queueLength === 0, 10_000, 'the queue to drain');
    assert.deepEqual(p.queued, { jobs: 0, entries: 0, bytes: 0 });
    assert.equal(p.get(a.id), undefined, 'only keepFinished (2) finished jobs are kept: the oldest went');
    const again = await p.submit({ imageId: 'x', files: ['etc/a.txt'] });
    await waitFor(() => p.get(again.id)?.state === 'done', 10_000, 'the job after draining');
    assert.equal(p.get(again.id)?.files_read, 1);
    // The finished job holds no entries any more.
    assert.deepEqual((p as any).jobs.get(again.id).entries, []);
    p.close();
  });

  test('bytes: estimated from path lengths; a trace file is refused once the queue is full before it is read', async () => {
    const root = layerRoot();
    assert.equal(entryBytes({ path: 'etc/a.txt', offset: 0, length: null }), 96 + 9);
    const long = `etc/${'x'.repeat(4000)}`;
    const p = new Prefetcher({ resolve: () => [{ id: '1', root }], traceDir: root, concurrency: 1, limits: { maxJobs: 1, maxEntries: 1000, maxBytes: 1 << 20, keepFinished: 10 } });
    (p as any).warm = () => new Promise(() => undefined); // never finishes: the job stays running
    await refused(p.submit({ imageId: 'x', files: Array.from({ length: 300 }, () => long) }), 413, /over prefetch.max_queued_bytes/);
    await p.submit({ imageId: 'x', files: ['etc/a.txt'] });
    fs.writeFileSync(path.join(root, 'big.trace'), 'etc/a.txt\n'.repeat(100));
    let read = false;
    const origRead = fs.promises.readFile;
    (fs.promises as any).readFile = async (...args: any[]) => {
      read = true;
      return (origRead as any)(...args);
    };
    try {
      await refused(p.submit({ imageId: 'x', traceFile: path.join(root, 'big.trace') }), 429, /prefetch queue full/);
    } finally {
      (fs.promises as any).readFile = origRead;
    }
    assert.equal(read, false, 'the trace file was not read');
    p.close();
    await refused(p.submit({ imageId: 'x', files: ['etc/a.txt'] }), 503, /shutting down/);
  });
});

/** VmRSS of a process, bytes. */
function rssOf(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

describe('a prefetch flood against the daemon', () => {
  let d: DaemonProcess;
  let image = '';

  before(async () => {
    d = await startDaemon({ convertMode: 'sync', config: { prefetch: { max_queued_jobs: 4 } } });
    const c = snapshotsClient(d.address);
    const { mounts } = await call(c, 'Prepare', { key: 'flood-active', parent: '' });
    const upper = mounts[0].type === 'bind' ? mounts[0].source : (mounts[0].options.find((o: string) => o.startsWith('upperdir=')) as string).slice(9);
    fs.mkdirSync(path.join(upper, 'etc'));
    fs.writeFileSync(path.join(upper, 'etc', 'hello.txt'), 'hello\n');
    await call(c, 'Commit', { name: 'sha256:flood', key: 'flood-active' });
    c.close();
    image = 'sha256:flood';
  });

  test('300 requests of 70,000 paths: 429 with Retry-After beyond the limits, RSS stays bounded, and the daemon serves on', async () => {
    // The request: 70,000 paths, about 840 KB.
    const body = JSON.stringify({ image_id: image, files: Array.from({ length: 70_000 }, (_, i) => `nope/${i.toString(36).padStart(4, '0')}`) });
    assert.ok(body.length > 700_000 && body.length < 1 << 20, `body ${body.length} bytes`);
    const pid = d.proc.pid as number;
    const baseline = rssOf(pid);
    let peak = baseline;
    const sampler = setInterval(() => {
      try {
        peak = Math.max(peak, rssOf(pid));
      } catch {
        // exited: the assertions below say so
      }
    }, 25);
    const statuses = new Map<number, number>();
    const retryAfter: string[] = [];
    const started = Date.now();
    let next = 0;
    const worker = async () => {
      while (next < 300) {
        next++;
        const r = await request(d.apiAddress, 'POST', '/prefetch', body);
        statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
        if (r.status === 429) {
          retryAfter.push(String(r.headers['retry-after']));
          assert.match(r.json.error, /prefetch queue full|prefetch requests are being read already/);
        }
      }
    };
    try {
      await Promise.all(Array.from({ length: 8 }, worker));
    } finally {
      clearInterval(sampler);
    }
    const floodMs = Date.now() - started;
    const accepted = statuses.get(202) ?? 0;
    const refusedN = statuses.get(429) ?? 0;
    console.log(`flood: ${JSON.stringify(Object.fromEntries(statuses))} in ${floodMs} ms; RSS ${Math.round(baseline / 2 ** 20)} MiB before, peak ${Math.round(peak / 2 ** 20)} MiB`);
    assert.equal(accepted + refusedN, 300, `only 202 and 429: ${JSON.stringify(Object.fromEntries(statuses))}`);
    assert.ok(accepted >= 4, `the first jobs are accepted (${accepted})`);
    assert.ok(refusedN >= 200, `most of the flood is refused (${refusedN})`);
    assert.ok(retryAfter.every((v) => /^\d+$/.test(v) && Number(v) >= 1 && Number(v) <= 60), `Retry-After: ${[...new Set(retryAfter)].join(', ')}`);
    // Unbounded, 300 such jobs took 4.3 GB; bounded, the queue holds a few.
    assert.ok(peak - baseline < 400 * 2 ** 20, `RSS grew by ${Math.round((peak - baseline) / 2 ** 20)} MiB`);
    assert.equal(d.proc.exitCode, null, 'the daemon is alive');

    // It drains, then answers and accepts as before.
    assert.equal((await request(d.apiAddress, 'GET', '/healthz')).status, 200);
    const during = (await request(d.apiAddress, 'GET', '/stats')).json.prefetch;
    assert.ok(during.queue <= 4 && during.queued_entries <= 4 * 70_000, JSON.stringify(during));
    await waitFor(async () => (await request(d.apiAddress, 'GET', '/stats')).json.prefetch.queue === 0, 120_000, 'the prefetch queue to drain');
    const stats = (await request(d.apiAddress, 'GET', '/stats')).json;
    assert.equal(stats.prefetch.rejected, refusedN);
    assert.equal(stats.prefetch.jobs_done, accepted);
    assert.equal(stats.prefetch.queued_entries, 0);
    assert.equal(stats.prefetch.queued_bytes, 0);
    const r = await request(d.apiAddress, 'POST', '/prefetch', JSON.stringify({ image_id: image, files: ['etc/hello.txt'] }));
    assert.equal(r.status, 202, r.body);
    await waitFor(async () => (await request(d.apiAddress, 'GET', `/prefetch/${r.json.id}`)).json.state === 'done', 10_000, 'the job after the flood');
    assert.equal((await request(d.apiAddress, 'GET', `/prefetch/${r.json.id}`)).json.files_read, 1);
    assert.ok(rssOf(pid) - baseline < 400 * 2 ** 20);
  });
});
