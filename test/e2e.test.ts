/**
 * End to end with the real stack: registry → containerd (proxy plugin
 * "dedup") → the daemon. Pull, run, inspect the committed chain, remove,
 * and check that containerd's GC leaves nothing behind in ROOT or in the
 * mount table.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { waitFor } from './helpers/daemon';
import { request } from './helpers/http';
import { type BuiltImage, busyboxImageDef, chainImageDef, tortureImageDef } from './helpers/images';
import { Stack, assertAllCollected, assertCommittedChain, assertDirsMatchSnapshots, assertNoDaemonErrors, daemonSnapshotNames } from './helpers/stack';

describe('e2e: pull, run, remove through containerd with --snapshotter=dedup', () => {
  let stack: Stack;
  const images: BuiltImage[] = [];

  before(async () => {
    stack = await Stack.start();
    images.push(...(await stack.pushImages([busyboxImageDef(), tortureImageDef(), chainImageDef()])));
  });

  after(async () => {
    await stack?.stop();
  });

  for (const [i, label] of ['busybox (3 layers)', 'torture (4 layers)', 'chain (40 layers)'].entries()) {
    test(`pull and run ${label}`, async () => {
      const img = images[i];
      assert.ok(img?.ref, 'image was pushed');
      await stack.pull(img.ref, 'dedup');
      const imgs = await stack.ctr(['images', 'ls', '-q']);
      assert.ok(imgs.stdout.split('\n').includes(img.ref), `ctr images ls shows ${img.ref}:\n${imgs.stdout}`);
      await assertCommittedChain(stack, 'dedup', img);

      const id = `e2e-run-${i}-${process.pid}`;
      const r = await stack.ctr(['run', '--snapshotter=dedup', '--rm', img.ref, id, '/bin/sh', '-c', 'cat /etc/passwd'], { timeoutMs: 60_000 });
      assert.equal(r.stdout, img.def.passwd, `container output was:\n${r.stdout}\nstderr:\n${r.stderr}`);
      const cs = await stack.ctr(['containers', 'ls', '-q']);
      assert.ok(!cs.stdout.includes(id), '--rm removed the container');
      // The daemon keeps one directory per snapshot it knows, nothing more.
      const names = await daemonSnapshotNames(stack);
      assert.ok(names.length >= img.chainIds.length, `daemon knows ${names.length} snapshots`);
      await assertDirsMatchSnapshots(stack);
    });
  }

  test('POST /prefetch takes the image reference, the chain id ctr shows, or a layer id; audit rows name the namespace', async () => {
    const img = images[0];
    const top = img.chainIds.at(-1) as string;
    const snaps = await stack.snapshots('dedup');
    assert.ok(snaps.some((s) => s.key === top), `ctr snapshots ls shows the top chain id ${top}`);
    const meta = new Database(path.join(stack.daemonRoot, 'metadata.db'), { readonly: true });
    const row = meta.prepare('SELECT id FROM snapshots WHERE key LIKE ?').get(`default/%/${top}`) as { id: number };
    meta.close();
    const post = (body: unknown) => request(stack.daemon.apiAddress, 'POST', '/prefetch', JSON.stringify(body));
    const files = ['/app/hello.txt'];
    for (const imageId of [img.ref as string, top, String(row.id)]) {
      const r = await post({ image_id: imageId, files });
      assert.equal(r.status, 202, `${imageId}: ${r.body}`);
      let job: any;
      await waitFor(async () => {
        job = (await request(stack.daemon.apiAddress, 'GET', `/prefetch/${r.json.id}`)).json;
        return job.state === 'done' || job.state === 'failed';
      }, 10_000, `prefetch job of ${imageId}`);
      assert.equal(job.files_read, 1, `${imageId}: ${JSON.stringify(job)}`);
      assert.equal(job.missing, 0);
    }
    // Another namespace has no such image, and says which namespace it looked in.
    const other = await post({ image_id: img.ref, namespace: 'elsewhere', files });
    assert.equal(other.status, 404, other.body);
    assert.match(other.json.error, /no image .* in containerd's namespace "elsewhere"/);
    const unknown = await post({ image_id: `${stack.registry}/nothing:1`, files });
    assert.equal(unknown.status, 404, unknown.body);
    const badNs = await post({ image_id: img.ref, namespace: '../x', files });
    assert.equal(badNs.status, 400, badNs.body);
    // Audit rows of containerd's calls carry the namespace (from the key: a proxy gets no header).
    await waitFor(() => {
      const db = new Database(path.join(stack.daemonRoot, 'audit.db'), { readonly: true });
      try {
        const rows = db.prepare("SELECT details FROM audit_logs WHERE operation IN ('prepare', 'commit')").all() as { details: string }[];
        return rows.length > 0 && rows.every((r) => JSON.parse(r.details).ns === 'default');
      } finally {
        db.close();
      }
    }, 10_000, 'audit rows of prepare and commit with ns "default"');
  });

  test('a container writes into its active dedup snapshot, which the image does not see', async () => {
    const img = images[0];
    const id = `e2e-write-${process.pid}`;
    const r = await stack.ctr(
      ['run', '--snapshotter=dedup', '--rm', img.ref as string, id, '/bin/sh', '-c', 'echo changed > /app/hello.txt && rm /etc/hostname && cat /app/hello.txt && ls /etc'],
      { timeoutMs: 60_000 },
    );
    assert.equal(r.stdout, 'changed\ngroup\npasswd\n');
    const again = await stack.ctr(['run', '--snapshotter=dedup', '--rm', img.ref as string, `${id}-2`, '/bin/cat', '/app/hello.txt', '/etc/hostname'], {
      timeoutMs: 60_000,
    });
    assert.equal(again.stdout, 'hello from the application layer\ndedup\n');
  });

  test('ctr images rm --sync: containerd GC removes every snapshot, directory and mount', async () => {
    const before = stack.daemonStorage();
    assert.ok(before.dirs.length + before.images.length > 0, 'there is something to collect');
    assert.ok(before.storeBytes > 0, 'the chunk store holds data before removal');
    await stack.ctr(['images', 'rm', '--sync', ...images.map((i) => i.ref as string)]);
    await assertAllCollected(stack);
    assertNoDaemonErrors(stack);
  });
});
