/**
 * dedup-differ's Diff through the daemon's socket, with real containerd
 * (its content store receives the layer) and real mounts: a container-like
 * change set made in a dedup active snapshot on a pulled image (a new file,
 * a changed one, a deleted one, a directory deleted and made again, a
 * hardlink, a symlink, an extended attribute) comes back as the layer tar
 * containerd's differ writes for an overlay upper, gzip-compressed, its
 * content labelled with its diff id and held by an expiring lease; mounts that are not a dedup snapshot
 * over its parent's view are answered Unimplemented (the diff service then
 * asks containerd's walking differ).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import zlib from 'node:zlib';
import * as grpc from '@grpc/grpc-js';
import { setXattr } from '../native/xattr';
import { ContainerdClient } from '../src/containerd/client';
import { diffService } from '../src/containerd/proto';
import { TarReader } from '../src/convert/tar-reader';
import { mountAll, unmount } from '../src/mount/mount';
import { atLeast, defaultContainerd, programOf } from './helpers/containerd-builds';
import { cleanupDaemons, waitFor } from './helpers/daemon';
import { Stack, assertNoDaemonErrors } from './helpers/stack';
import { applyTarToTree, diffTrees, parseCtrMounts, protectedView, walkMounted } from './helpers/trees';

after(() => cleanupDaemons());

const GZ = 'application/vnd.oci.image.layer.v1.tar+gzip';

type Wire = { type: string; source: string; target?: string; options: string[] };

function callDiff(address: string, req: Record<string, unknown>): Promise<{ diff: { media_type: string; digest: string; size: string } }> {
  const Client = diffService();
  const client = new Client(`unix:${address}`, grpc.credentials.createInsecure()) as unknown as Record<string, (...a: unknown[]) => void> & { close(): void };
  const md = new grpc.Metadata();
  md.set('containerd-namespace', 'default');
  return new Promise((resolve, reject) => {
    client.Diff(req, md, { deadline: Date.now() + 120_000 }, (err: Error | null, res: { diff: { media_type: string; digest: string; size: string } }) => {
      client.close();
      if (err) reject(err);
      else resolve(res);
    });
  });
}

test("Diff writes a dedup snapshot's changes as the layer containerd's differ would, into containerd's content store", async () => {
  const stack = await Stack.start();
  try {
    const [img] = await stack.pushImages([
      {
        name: 'diff-base',
        tag: 'v1',
        passwd: '',
        expect: [],
        layers: [
          [
            { type: 'dir', path: 'keep' },
            { type: 'file', path: 'keep/a', content: 'a\n' },
            { type: 'dir', path: 'replace' },
            { type: 'file', path: 'replace/old', content: 'old\n' },
            { type: 'file', path: 'remove-me', content: 'bye\n' },
          ],
        ],
      },
    ]);
    await stack.pull(img.ref as string, 'dedup');
    const top = img.chainIds[img.chainIds.length - 1];

    const prepared = await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'prepare', '--mounts', 'diff-active', top]);
    await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'label', 'diff-active', `containerd.io/gc.root=${new Date().toISOString()}`]);
    const right = parseCtrMounts(prepared.stdout) as Wire[];
    const mnt = path.join(stack.dir, 'mnt-diff-active');
    fs.mkdirSync(mnt);
    await mountAll(right, mnt);
    try {
      fs.writeFileSync(path.join(mnt, 'keep', 'a'), 'changed\n');
      fs.writeFileSync(path.join(mnt, 'keep', 'b'), 'new file\n');
      fs.linkSync(path.join(mnt, 'keep', 'b'), path.join(mnt, 'keep', 'b-link'));
      fs.symlinkSync('b', path.join(mnt, 'keep', 'sym'));
      setXattr(path.join(mnt, 'keep', 'b'), 'user.mark', Buffer.from([0xff, 0x00, 0x41]));
      fs.rmSync(path.join(mnt, 'remove-me'));
      fs.rmSync(path.join(mnt, 'replace'), { recursive: true });
      fs.mkdirSync(path.join(mnt, 'replace'));
      fs.writeFileSync(path.join(mnt, 'replace', 'new'), 'fresh\n');
    } finally {
      await unmount(mnt);
    }
    const left = (await protectedView(stack, 'dedup', 'diff-parent-view', top)) as Wire[];

    const res = await callDiff(stack.daemonAddress, { left, right, media_type: GZ, ref: 'diff-test', labels: { 'test.label': 'kept' } });
    let ourTar = Buffer.alloc(0);
    assert.equal(res.diff.media_type, GZ);
    const client = new ContainerdClient(stack.containerdAddress, 'default');
    try {
      const chunks: Buffer[] = [];
      for await (const c of client.streamContent(res.diff.digest, Number(res.diff.size))) chunks.push(c);
      const blob = Buffer.concat(chunks);
      assert.equal(`sha256:${crypto.createHash('sha256').update(blob).digest('hex')}`, res.diff.digest);
      const tar = zlib.gunzipSync(blob);
      ourTar = tar;
      const labels = await client.contentLabels(res.diff.digest);
      assert.equal(labels['containerd.io/uncompressed'], `sha256:${crypto.createHash('sha256').update(tar).digest('hex')}`, 'labelled with its diff id');
      assert.equal(labels['test.label'], 'kept', "the request's labels");

      const reader = new TarReader((async function* () {
        yield tar;
      })());
      const seen: string[] = [];
      const data = new Map<string, string>();
      const xattrs = new Map<string, string>();
      for (let h = await reader.next(); h; h = await reader.next()) {
        seen.push(`${h.typeflag} ${h.name}${h.linkname ? ` -> ${h.linkname}` : ''}`);
        const parts: Buffer[] = [];
        for await (const p of reader.data()) parts.push(p);
        data.set(h.name, Buffer.concat(parts).toString());
        for (const [k, v] of h.pax) if (k.startsWith('SCHILY.xattr.')) xattrs.set(`${h.name} ${k.slice(13)}`, v.toString('hex'));
      }
      assert.deepEqual(seen, ['5 keep/', '0 keep/a', '0 keep/b', '1 keep/b-link -> keep/b', '2 keep/sym -> b', '0 .wh.remove-me', '5 replace/', '0 replace/.wh..wh..opq', '0 replace/new']);
      assert.equal(data.get('keep/a'), 'changed\n');
      assert.equal(data.get('keep/b'), 'new file\n');
      assert.equal(data.get('replace/new'), 'fresh\n');
      assert.equal(xattrs.get('keep/b user.mark'), 'ff0041');
    } finally {
      client.close();
    }
    await waitFor(() => stack.daemon.logs().some((l) => l.op === 'diff' && typeof l.digest === 'string'), 10_000, 'the daemon\'s "op":"diff" line');
    // No lease came with the request: the layer is kept by an expiring lease of the daemon's until the caller references it.
    assert.match((await stack.ctr(['leases', 'ls'])).stdout, /dedup-diff-[0-9a-f]{12}/);
    const logs = stack.daemon.logs().filter((l) => l.op === 'diff' && typeof l.digest === 'string');
    assert.equal(logs.length, 1, 'one "wrote the changes of snapshot" line');
    assert.equal(logs[0].digest, res.diff.digest);

    // The same snapshot through containerd's diff service, whose list here is containerd's default (walking, which
    // compares the two mounted trees): each layer applied on the parent gives the tree the active snapshot shows,
    // dedup-differ's exactly; walking's without the extended attributes containerd's tar writer leaves out (it
    // keeps security.capability only, so user.mark is not in its layer).
    const walkingBlob = execFileSync(programOf(stack.build, 'ctr'), ['--address', stack.containerdAddress, '-n', 'default', 'snapshots', '--snapshotter', 'dedup', 'diff', 'diff-active'], { maxBuffer: 64 << 20, timeout: 120_000 });
    assert.equal(stack.daemon.logs().filter((l) => l.op === 'diff' && typeof l.digest === 'string').length, 1, 'walking wrote that one, not dedup-differ');
    const parentTree = await walkMounted(left, path.join(stack.dir, 'walk-parent'));
    const activeTree = await walkMounted(right, path.join(stack.dir, 'walk-active'));
    assert.deepEqual(diffTrees(await applyTarToTree(parentTree, ourTar), activeTree, 'parent + dedup-differ layer', 'active snapshot'), []);
    const capabilityOnly: typeof activeTree = new Map(
      [...activeTree].map(([p, n]) => [p, { ...n, xattrs: Object.fromEntries(Object.entries(n.xattrs).filter(([k]) => k === 'security.capability' || parentTree.get(p)?.xattrs[k] !== undefined)) }]),
    );
    assert.deepEqual(diffTrees(await applyTarToTree(parentTree, zlib.gunzipSync(walkingBlob)), capabilityOnly, 'parent + walking layer', 'active snapshot (xattrs as walking keeps them)'), []);

    // An upper that needs its lower layers (redirect_dir): Unimplemented before anything is written.
    const upperDir = (right[0].options.find((o) => o.startsWith('upperdir=')) ?? '').slice('upperdir='.length);
    assert.ok(upperDir, 'the active snapshot is an overlay with an upper directory');
    setXattr(path.join(upperDir, 'replace'), 'trusted.overlay.redirect', '/elsewhere');
    await assert.rejects(callDiff(stack.daemonAddress, { left, right, media_type: GZ }), (err: grpc.ServiceError) => err.code === grpc.status.UNIMPLEMENTED && /trusted\.overlay\.redirect/.test(err.details));

    // Not a dedup snapshot over its parent's view: Unimplemented, for the diff service's next differ.
    await assert.rejects(callDiff(stack.daemonAddress, { left: right, right: left, media_type: GZ }), (err: grpc.ServiceError) => err.code === grpc.status.UNIMPLEMENTED);
    await assert.rejects(callDiff(stack.daemonAddress, { left, right, media_type: 'application/vnd.oci.image.layer.v1.tar+zstd' }), (err: grpc.ServiceError) => err.code === grpc.status.UNIMPLEMENTED && /media type/.test(err.details));
    assertNoDaemonErrors(stack);
  } finally {
    await stack.stop();
  }
});

test("through containerd's diff service (default = [dedup-differ, walking]): ctr snapshots diff of a dedup snapshot is written by dedup-differ", async (t) => {
  const build = defaultContainerd();
  if (!atLeast(build, 1, 7)) {
    t.skip(`SKIP: containerd ${build.version} has no proxy differs (they come with 1.7)`);
    return;
  }
  const stack = await Stack.start({ diffServiceDefault: ['dedup-differ', 'walking'] });
  try {
    const [img] = await stack.pushImages([
      { name: 'diff-service', tag: 'v1', passwd: '', expect: [], layers: [[{ type: 'dir', path: 'd' }, { type: 'file', path: 'd/old', content: 'old\n' }]] },
    ]);
    await stack.pull(img.ref as string, 'dedup');
    const top = img.chainIds[img.chainIds.length - 1];
    const prepared = await stack.ctr(['snapshots', '--snapshotter', 'dedup', 'prepare', '--mounts', 'svc-active', top]);
    const mnt = path.join(stack.dir, 'mnt-svc-active');
    fs.mkdirSync(mnt);
    await mountAll(parseCtrMounts(prepared.stdout), mnt);
    try {
      fs.writeFileSync(path.join(mnt, 'd', 'new'), 'through the diff service\n');
      fs.rmSync(path.join(mnt, 'd', 'old'));
    } finally {
      await unmount(mnt);
    }
    // ctr writes the layer blob to stdout: read as bytes.
    const blob = execFileSync(programOf(stack.build, 'ctr'), ['--address', stack.containerdAddress, '-n', 'default', 'snapshots', '--snapshotter', 'dedup', 'diff', 'svc-active'], { maxBuffer: 64 << 20, timeout: 120_000 });
    const tar = zlib.gunzipSync(blob);
    const reader = new TarReader((async function* () {
      yield tar;
    })());
    const seen: string[] = [];
    for (let h = await reader.next(); h; h = await reader.next()) seen.push(`${h.typeflag} ${h.name}`);
    assert.deepEqual(seen, ['5 d/', '0 d/new', '0 d/.wh.old'], 'entries in name order (a whiteout where its name sorts)');
    // The daemon's log reaches the test through a pipe: give its last lines a moment.
    await waitFor(() => stack.daemon.logs().some((l) => l.op === 'diff'), 10_000, 'the daemon\'s "op":"diff" line').catch(() => undefined);
    const diffLines = stack.daemon.logs().filter((l) => l.op === 'diff' || /Diff|diff/.test(String(l.msg)) || /Diff/.test(String(l.method ?? '')));
    assert.equal(diffLines.filter((l) => l.op === 'diff' && typeof l.digest === 'string').length, 1, `dedup-differ wrote it (its one "op":"diff" line), not the walking differ: ${JSON.stringify(diffLines.map((l) => l.msg ?? l.err))}`);
    assertNoDaemonErrors(stack);
  } finally {
    await stack.stop();
  }
});
