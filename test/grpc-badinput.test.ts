import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import {
  type DaemonProcess,
  type SnapshotsClient,
  call,
  snapshotsClient,
  startDaemon,
  cleanupDaemons,
} from './helpers/daemon';
import {
  CodeRecorder,
  UNARY_METHODS,
  alienCall,
  alienClient,
  alienList,
  assertOnlyNumericDirs,
  listWithin,
  rawClient,
  rawList,
  rawUnary,
  snapshotDirs,
  upperDirOf,
} from './helpers/badinput-grpc';

// These tests pin the RPC contract and crash behaviour: their daemons convert
// layers at Commit (convert_mode "sync") so ROOT's state is deterministic.
// Background conversion is covered by erofs, erofs-e2e, e2e and differential.

/**
 * Every RPC of containerd's Snapshots service, against the real daemon over
 * its socket, with good and bad input. containerd's retry and unpack logic
 * keys off the exact status code, so each case asserts the exact code, and
 * no answer may ever be UNKNOWN.
 */

const rec = new CodeRecorder();

const KIND = { VIEW: 1, ACTIVE: 2, COMMITTED: 3 };
const REF = 'containerd.io/snapshot.ref';

let d: DaemonProcess;
let c: SnapshotsClient;

before(async () => {
  d = await startDaemon({ convertMode: 'sync' });
  c = snapshotsClient(d.address, 'badinput');
});

after(async () => {
  c?.close();
  if (d) {
    const code = await d.stop();
    assert.equal(code, 0, `daemon did not stop cleanly:\n${d.output().slice(-4000)}`);
  }
  // Daemons leave their EROFS layer mounts on purpose: detach and delete them.
  await cleanupDaemons();
});

/** Prepares `key` and commits it as `name` (with optional parent). */
async function committed(name: string, parent = '', labels: Record<string, string> = {}): Promise<void> {
  const key = `${name}-active-${Math.random().toString(36).slice(2)}`;
  await rec.ok(`prepare ${key}`, call(c, 'Prepare', { key, parent }));
  await rec.ok(`commit ${name}`, call(c, 'Commit', { name, key, labels }));
}

function stat(client: SnapshotsClient, key: string): Promise<{ info: any }> {
  return call(client, 'Stat', { key });
}

describe('Prepare', () => {
  test('good input: no parent gives a writable bind mount under ROOT/snapshots/<id>/fs', async () => {
    const res = await rec.ok('prepare p-good', call(c, 'Prepare', { key: 'p-good', labels: { a: 'b' } }));
    assert.equal(res.mounts.length, 1);
    assert.equal(res.mounts[0].type, 'bind');
    assert.ok(res.mounts[0].options.includes('rw'), JSON.stringify(res.mounts));
    assert.match(res.mounts[0].source, new RegExp(`^${d.root}/snapshots/[0-9]+/fs$`));
    const { info } = await rec.ok('stat p-good', stat(c, 'p-good'));
    assert.equal(info.name, 'p-good');
    assert.equal(info.kind, KIND.ACTIVE);
    assert.equal(info.parent, '');
    assert.deepEqual(info.labels, { a: 'b' });
  });

  test('good input: committed parent gives an overlay with the parent as lowerdir', async () => {
    await committed('p-parent');
    const res = await rec.ok('prepare p-child', call(c, 'Prepare', { key: 'p-child', parent: 'p-parent' }));
    assert.equal(res.mounts[0].type, 'overlay');
    const opts: string[] = res.mounts[0].options;
    assert.ok(opts.some((o) => o.startsWith('upperdir=')), JSON.stringify(opts));
    assert.ok(opts.some((o) => o.startsWith('workdir=')), JSON.stringify(opts));
    assert.ok(opts.some((o) => o.startsWith('lowerdir=')), JSON.stringify(opts));
    assert.equal((await stat(c, 'p-child')).info.parent, 'p-parent');
  });

  test('empty key is INVALID_ARGUMENT', async () => {
    await rec.fails('prepare empty key', call(c, 'Prepare', { key: '' }), status.INVALID_ARGUMENT);
    await rec.fails('prepare no key at all', call(c, 'Prepare', {}), status.INVALID_ARGUMENT);
  });

  test('missing parent is NOT_FOUND naming the parent', async () => {
    await rec.fails(
      'prepare missing parent',
      call(c, 'Prepare', { key: 'p-orphan', parent: 'p-no-such-parent' }),
      status.NOT_FOUND,
      ['p-no-such-parent'],
    );
    await rec.fails('stat after failed prepare', stat(c, 'p-orphan'), status.NOT_FOUND, ['p-orphan']);
  });

  test('active or view parent is INVALID_ARGUMENT', async () => {
    await rec.ok('prepare p-active-parent', call(c, 'Prepare', { key: 'p-active-parent' }));
    await rec.fails(
      'prepare on active parent',
      call(c, 'Prepare', { key: 'p-on-active', parent: 'p-active-parent' }),
      status.INVALID_ARGUMENT,
      ['p-active-parent'],
    );
    await committed('p-base');
    await rec.ok('view p-view-parent', call(c, 'View', { key: 'p-view-parent', parent: 'p-base' }));
    await rec.fails(
      'prepare on view parent',
      call(c, 'Prepare', { key: 'p-on-view', parent: 'p-view-parent' }),
      status.INVALID_ARGUMENT,
      ['p-view-parent'],
    );
    await rec.fails('nothing created', stat(c, 'p-on-view'), status.NOT_FOUND);
  });

  test('duplicate key is ALREADY_EXISTS, whatever the kind of the existing snapshot', async () => {
    await rec.ok('prepare p-dup', call(c, 'Prepare', { key: 'p-dup' }));
    await rec.fails('prepare p-dup again', call(c, 'Prepare', { key: 'p-dup' }), status.ALREADY_EXISTS, ['p-dup']);
    await committed('p-dup-committed');
    await rec.fails(
      'prepare onto a committed name',
      call(c, 'Prepare', { key: 'p-dup-committed' }),
      status.ALREADY_EXISTS,
    );
    // Without containerd.io/snapshot.ref the daemon must never invent AlreadyExists; with it on a
    // fresh key it must not either (there is nothing to serve remotely here).
    await rec.ok('prepare with ref label', call(c, 'Prepare', { key: 'p-ref', labels: { [REF]: 'sha256:feed' } }));
  });
});

describe('View', () => {
  test('good input: a view of a committed snapshot is read-only', async () => {
    await committed('v-base');
    const res = await rec.ok('view v-good', call(c, 'View', { key: 'v-good', parent: 'v-base' }));
    assert.equal(res.mounts.length, 1);
    assert.ok(res.mounts[0].options.includes('ro'), JSON.stringify(res.mounts));
    assert.equal((await stat(c, 'v-good')).info.kind, KIND.VIEW);
    const empty = await rec.ok('view without parent', call(c, 'View', { key: 'v-empty' }));
    assert.ok(empty.mounts[0].options.includes('ro'), JSON.stringify(empty.mounts));
  });

  test('bad input', async () => {
    await rec.fails('view empty key', call(c, 'View', { key: '', parent: 'v-base' }), status.INVALID_ARGUMENT);
    await rec.fails('view missing parent', call(c, 'View', { key: 'v-x', parent: 'v-nope' }), status.NOT_FOUND, ['v-nope']);
    await rec.ok('prepare v-active', call(c, 'Prepare', { key: 'v-active' }));
    await rec.fails(
      'view of active parent',
      call(c, 'View', { key: 'v-y', parent: 'v-active' }),
      status.INVALID_ARGUMENT,
    );
    await rec.fails('view of view parent', call(c, 'View', { key: 'v-z', parent: 'v-good' }), status.INVALID_ARGUMENT);
    await rec.fails('view duplicate', call(c, 'View', { key: 'v-good', parent: 'v-base' }), status.ALREADY_EXISTS, [
      'v-good',
    ]);
    await rec.fails('view onto active key', call(c, 'View', { key: 'v-active' }), status.ALREADY_EXISTS);
  });
});

describe('Mounts', () => {
  test('good input: the same mounts Prepare and View returned', async () => {
    const prepared = await rec.ok('prepare m-a', call(c, 'Prepare', { key: 'm-a' }));
    const again = await rec.ok('mounts m-a', call(c, 'Mounts', { key: 'm-a' }));
    assert.deepEqual(again.mounts, prepared.mounts);
    await committed('m-base');
    const viewed = await rec.ok('view m-v', call(c, 'View', { key: 'm-v', parent: 'm-base' }));
    assert.deepEqual((await rec.ok('mounts m-v', call(c, 'Mounts', { key: 'm-v' }))).mounts, viewed.mounts);
  });

  test('bad input', async () => {
    await rec.fails('mounts unknown', call(c, 'Mounts', { key: 'm-unknown-key' }), status.NOT_FOUND, ['m-unknown-key']);
    await rec.fails('mounts empty', call(c, 'Mounts', { key: '' }), status.INVALID_ARGUMENT);
    await rec.fails('mounts of committed', call(c, 'Mounts', { key: 'm-base' }), status.FAILED_PRECONDITION, ['m-base']);
  });
});

describe('Commit', () => {
  test('good input: the active key becomes a committed name carrying exactly the given labels', async () => {
    await rec.ok('prepare c-a', call(c, 'Prepare', { key: 'c-a', labels: { old: '1' } }));
    await rec.ok('commit c-a', call(c, 'Commit', { name: 'c-name', key: 'c-a', labels: { fresh: '2' } }));
    const { info } = await rec.ok('stat c-name', stat(c, 'c-name'));
    assert.equal(info.kind, KIND.COMMITTED);
    assert.deepEqual(info.labels, { fresh: '2' });
    await rec.fails('active key is gone', stat(c, 'c-a'), status.NOT_FOUND, ['c-a']);
  });

  test('bad input', async () => {
    await rec.ok('prepare c-b', call(c, 'Prepare', { key: 'c-b' }));
    await rec.fails('commit empty name', call(c, 'Commit', { name: '', key: 'c-b' }), status.INVALID_ARGUMENT);
    await rec.fails('commit empty key', call(c, 'Commit', { name: 'c-b-name', key: '' }), status.INVALID_ARGUMENT);
    await rec.fails(
      'commit unknown key',
      call(c, 'Commit', { name: 'c-b-name', key: 'c-no-such-key' }),
      status.NOT_FOUND,
      ['c-no-such-key'],
    );
    await rec.fails(
      'commit onto an existing committed name',
      call(c, 'Commit', { name: 'c-name', key: 'c-b' }),
      status.ALREADY_EXISTS,
      ['c-name'],
    );
    await rec.ok('prepare c-other', call(c, 'Prepare', { key: 'c-other' }));
    await rec.fails(
      'commit onto an existing active key',
      call(c, 'Commit', { name: 'c-other', key: 'c-b' }),
      status.ALREADY_EXISTS,
      ['c-other'],
    );
    await rec.fails('commit onto itself', call(c, 'Commit', { name: 'c-b', key: 'c-b' }), status.ALREADY_EXISTS);
    // The failed commits left c-b active and untouched.
    assert.equal((await stat(c, 'c-b')).info.kind, KIND.ACTIVE);

    await committed('c-base');
    await rec.ok('view c-view', call(c, 'View', { key: 'c-view', parent: 'c-base' }));
    await rec.fails(
      'commit of a view',
      call(c, 'Commit', { name: 'c-from-view', key: 'c-view' }),
      status.FAILED_PRECONDITION,
      ['c-view'],
    );
    await rec.fails(
      'commit of a committed snapshot',
      call(c, 'Commit', { name: 'c-from-committed', key: 'c-base' }),
      status.FAILED_PRECONDITION,
      ['c-base'],
    );
    // containerd checks the name before the kind: a taken name wins.
    await rec.fails(
      'commit of a committed snapshot onto a taken name',
      call(c, 'Commit', { name: 'c-name', key: 'c-base' }),
      status.ALREADY_EXISTS,
      ['c-name'],
    );
    assert.equal((await stat(c, 'c-view')).info.kind, KIND.VIEW);
    await rec.fails('nothing named c-from-view', stat(c, 'c-from-view'), status.NOT_FOUND);
  });
});

describe('Remove', () => {
  test('good input: active, view and committed snapshots go, with their directories', async () => {
    const dirCount = snapshotDirs(d.root).length;
    await rec.ok('prepare r-a', call(c, 'Prepare', { key: 'r-a' }));
    await committed('r-base');
    await rec.ok('view r-v', call(c, 'View', { key: 'r-v', parent: 'r-base' }));
    assert.equal(snapshotDirs(d.root).length, dirCount + 3);
    await rec.ok('remove r-a', call(c, 'Remove', { key: 'r-a' }));
    await rec.ok('remove r-v', call(c, 'Remove', { key: 'r-v' }));
    await rec.ok('remove r-base', call(c, 'Remove', { key: 'r-base' }));
    assert.equal(snapshotDirs(d.root).length, dirCount);
    await rec.fails('stat removed', stat(c, 'r-base'), status.NOT_FOUND, ['r-base']);
  });

  test('bad input', async () => {
    await rec.fails('remove unknown', call(c, 'Remove', { key: 'r-unknown' }), status.NOT_FOUND, ['r-unknown']);
    await rec.fails('remove empty', call(c, 'Remove', { key: '' }), status.INVALID_ARGUMENT);
    await committed('r-parent');
    await rec.ok('prepare r-child', call(c, 'Prepare', { key: 'r-child', parent: 'r-parent' }));
    await rec.fails('remove with active child', call(c, 'Remove', { key: 'r-parent' }), status.FAILED_PRECONDITION, [
      'r-parent',
    ]);
    await rec.ok('commit r-child', call(c, 'Commit', { name: 'r-child-c', key: 'r-child' }));
    await rec.fails(
      'remove with committed child',
      call(c, 'Remove', { key: 'r-parent' }),
      status.FAILED_PRECONDITION,
    );
    await rec.ok('view on r-child-c', call(c, 'View', { key: 'r-grandview', parent: 'r-child-c' }));
    await rec.fails('remove with view child', call(c, 'Remove', { key: 'r-child-c' }), status.FAILED_PRECONDITION);
    assert.equal((await stat(c, 'r-parent')).info.kind, KIND.COMMITTED);
    await rec.ok('remove leaf view', call(c, 'Remove', { key: 'r-grandview' }));
    await rec.ok('remove r-child-c', call(c, 'Remove', { key: 'r-child-c' }));
    await rec.ok('remove r-parent', call(c, 'Remove', { key: 'r-parent' }));
    await rec.fails('remove twice', call(c, 'Remove', { key: 'r-parent' }), status.NOT_FOUND);
  });
});

describe('Stat', () => {
  test('good input and bad input', async () => {
    await committed('s-base', '', { x: 'y' });
    await rec.ok('prepare s-a', call(c, 'Prepare', { key: 's-a', parent: 's-base' }));
    const { info } = await rec.ok('stat s-a', stat(c, 's-a'));
    assert.equal(info.name, 's-a');
    assert.equal(info.parent, 's-base');
    assert.equal(info.kind, KIND.ACTIVE);
    assert.ok(Number(info.created_at.seconds) > 1_600_000_000, JSON.stringify(info.created_at));
    assert.deepEqual((await stat(c, 's-base')).info.labels, { x: 'y' });
    await rec.fails('stat unknown', stat(c, 's-unknown/with/slashes'), status.NOT_FOUND, ['s-unknown/with/slashes']);
    await rec.fails('stat empty', stat(c, ''), status.INVALID_ARGUMENT);
  });
});

describe('Usage', () => {
  test('good input: measured for an active snapshot, recorded at commit', async () => {
    const res = await rec.ok('prepare u-a', call(c, 'Prepare', { key: 'u-a' }));
    const upper = upperDirOf(res.mounts);
    const empty = await rec.ok('usage empty', call(c, 'Usage', { key: 'u-a' }));
    assert.equal(Number(empty.inodes), 1);
    fs.writeFileSync(path.join(upper, 'f'), Buffer.alloc(64 * 1024, 7));
    fs.mkdirSync(path.join(upper, 'dir'));
    const used = await rec.ok('usage with data', call(c, 'Usage', { key: 'u-a' }));
    assert.equal(Number(used.inodes), 3);
    assert.ok(Number(used.size) >= 64 * 1024, JSON.stringify(used));
    await rec.ok('commit u-a', call(c, 'Commit', { name: 'u-c', key: 'u-a' }));
    const recorded = await rec.ok('usage committed', call(c, 'Usage', { key: 'u-c' }));
    assert.equal(Number(recorded.inodes), 3);
    assert.equal(Number(recorded.size), Number(used.size));
    await rec.ok('view u-v', call(c, 'View', { key: 'u-v', parent: 'u-c' }));
    await rec.ok('usage view', call(c, 'Usage', { key: 'u-v' }));
  });

  test('bad input', async () => {
    await rec.fails('usage unknown', call(c, 'Usage', { key: 'u-unknown' }), status.NOT_FOUND, ['u-unknown']);
    await rec.fails('usage empty', call(c, 'Usage', { key: '' }), status.INVALID_ARGUMENT);
  });
});

describe('labels over 4096 bytes (key + value)', () => {
  const exact = { k: 'v'.repeat(4095) };
  const over = { k: 'v'.repeat(4096) };
  // 2 + 2 × 2047 = 4096 bytes but only 2049 characters; 2 + 2 × 2048 = 4098 bytes.
  const exactMultibyte = { ab: 'é'.repeat(2047) };
  const overMultibyte = { ab: 'é'.repeat(2048) };

  test('Prepare', async () => {
    await rec.ok('prepare 4096', call(c, 'Prepare', { key: 'l-p1', labels: exact }));
    await rec.ok('prepare 4096 multibyte', call(c, 'Prepare', { key: 'l-p2', labels: exactMultibyte }));
    assert.deepEqual((await stat(c, 'l-p2')).info.labels, exactMultibyte);
    await rec.fails('prepare 4097', call(c, 'Prepare', { key: 'l-p3', labels: over }), status.INVALID_ARGUMENT);
    await rec.fails(
      'prepare 4098 multibyte',
      call(c, 'Prepare', { key: 'l-p4', labels: overMultibyte }),
      status.INVALID_ARGUMENT,
    );
    await rec.fails(
      'prepare long key',
      call(c, 'Prepare', { key: 'l-p5', labels: { ['k'.repeat(4097)]: '' } }),
      status.INVALID_ARGUMENT,
    );
    await rec.fails('nothing created', stat(c, 'l-p3'), status.NOT_FOUND);
  });

  test('View', async () => {
    await committed('l-base');
    await rec.ok('view 4096', call(c, 'View', { key: 'l-v1', parent: 'l-base', labels: exact }));
    await rec.fails(
      'view 4097',
      call(c, 'View', { key: 'l-v2', parent: 'l-base', labels: over }),
      status.INVALID_ARGUMENT,
    );
    await rec.fails(
      'view 4098 multibyte',
      call(c, 'View', { key: 'l-v3', parent: 'l-base', labels: overMultibyte }),
      status.INVALID_ARGUMENT,
    );
  });

  test('Commit', async () => {
    await rec.ok('prepare l-c', call(c, 'Prepare', { key: 'l-c' }));
    await rec.fails('commit 4097', call(c, 'Commit', { name: 'l-c-name', key: 'l-c', labels: over }), status.INVALID_ARGUMENT);
    await rec.fails(
      'commit 4098 multibyte',
      call(c, 'Commit', { name: 'l-c-name', key: 'l-c', labels: overMultibyte }),
      status.INVALID_ARGUMENT,
    );
    assert.equal((await stat(c, 'l-c')).info.kind, KIND.ACTIVE);
    await rec.ok('commit 4096', call(c, 'Commit', { name: 'l-c-name', key: 'l-c', labels: exact }));
    assert.deepEqual((await stat(c, 'l-c-name')).info.labels, exact);
  });

  test('Update', async () => {
    await committed('l-u', '', { keep: 'me' });
    await rec.fails(
      'update 4097',
      call(c, 'Update', { info: { name: 'l-u', labels: over }, update_mask: { paths: ['labels.k'] } }),
      status.INVALID_ARGUMENT,
    );
    await rec.fails(
      'update 4098 multibyte, empty mask',
      call(c, 'Update', { info: { name: 'l-u', labels: overMultibyte } }),
      status.INVALID_ARGUMENT,
    );
    assert.deepEqual((await stat(c, 'l-u')).info.labels, { keep: 'me' });
    const res = await rec.ok(
      'update 4096',
      call(c, 'Update', { info: { name: 'l-u', labels: exact }, update_mask: { paths: ['labels.k'] } }),
    );
    assert.deepEqual(res.info.labels, { keep: 'me', ...exact });
  });
});

describe('Update', () => {
  test('labels.<k> sets and deletes one label, labels and an empty mask replace them all', async () => {
    await committed('up-a', '', { a: '1', b: '2' });
    const before = (await stat(c, 'up-a')).info;

    let res = await rec.ok(
      'set labels.c',
      call(c, 'Update', { info: { name: 'up-a', labels: { c: '3', ignored: 'x' } }, update_mask: { paths: ['labels.c'] } }),
    );
    assert.deepEqual(res.info.labels, { a: '1', b: '2', c: '3' });
    assert.equal(res.info.name, 'up-a');
    assert.equal(res.info.kind, KIND.COMMITTED);
    assert.ok(
      Number(res.info.updated_at.seconds) * 1e9 + res.info.updated_at.nanos >=
        Number(before.updated_at.seconds) * 1e9 + before.updated_at.nanos,
    );
    assert.deepEqual(res.info.created_at, before.created_at);

    res = await rec.ok(
      'delete labels.a, change labels.b',
      call(c, 'Update', { info: { name: 'up-a', labels: { b: 'two' } }, update_mask: { paths: ['labels.a', 'labels.b'] } }),
    );
    assert.deepEqual(res.info.labels, { b: 'two', c: '3' });

    res = await rec.ok(
      'labels replaces',
      call(c, 'Update', { info: { name: 'up-a', labels: { x: '1' } }, update_mask: { paths: ['labels'] } }),
    );
    assert.deepEqual(res.info.labels, { x: '1' });

    res = await rec.ok('empty mask replaces', call(c, 'Update', { info: { name: 'up-a', labels: { y: '2' } }, update_mask: { paths: [] } }));
    assert.deepEqual(res.info.labels, { y: '2' });
    res = await rec.ok('no mask at all replaces', call(c, 'Update', { info: { name: 'up-a', labels: { z: '3' } } }));
    assert.deepEqual(res.info.labels, { z: '3' });
    res = await rec.ok('empty mask, no labels clears', call(c, 'Update', { info: { name: 'up-a' } }));
    assert.deepEqual(res.info.labels, {});
    assert.deepEqual((await stat(c, 'up-a')).info.labels, {});

    // Labels of an active snapshot can be updated too.
    await rec.ok('prepare up-active', call(c, 'Prepare', { key: 'up-active' }));
    res = await rec.ok(
      'update active',
      call(c, 'Update', { info: { name: 'up-active', labels: { [REF]: 'sha256:1' } }, update_mask: { paths: [`labels.${REF}`] } }),
    );
    assert.deepEqual(res.info.labels, { [REF]: 'sha256:1' });
  });

  test('masks naming parent, name or anything else are INVALID_ARGUMENT and change nothing', async () => {
    await committed('up-p', '', { keep: 'yes' });
    await committed('up-other');
    for (const paths of [['parent'], ['name'], ['kind'], ['labels.keep', 'parent'], ['labels.'], ['created_at']]) {
      await rec.fails(
        `update mask ${paths}`,
        call(c, 'Update', { info: { name: 'up-p', parent: 'up-other', labels: { keep: 'no' } }, update_mask: { paths } }),
        status.INVALID_ARGUMENT,
      );
    }
    const { info } = await stat(c, 'up-p');
    assert.equal(info.parent, '');
    assert.deepEqual(info.labels, { keep: 'yes' });
  });

  test('bad input', async () => {
    await rec.fails(
      'update unknown',
      call(c, 'Update', { info: { name: 'up-unknown', labels: {} }, update_mask: { paths: ['labels'] } }),
      status.NOT_FOUND,
      ['up-unknown'],
    );
    await rec.fails('update empty name', call(c, 'Update', { info: { name: '' } }), status.INVALID_ARGUMENT);
    await rec.fails('update without info', call(c, 'Update', { update_mask: { paths: ['labels'] } }), status.INVALID_ARGUMENT);
  });
});

describe('List', () => {
  // A daemon of its own: the filters are checked against the whole set.
  let ld: DaemonProcess;
  let lc: SnapshotsClient;
  const names = (infos: any[]) => infos.map((i) => i.name).sort();

  before(async () => {
    ld = await startDaemon({ convertMode: 'sync' });
    lc = snapshotsClient(ld.address, 'ns');
    const mk = async (key: string, parent = '', labels = {}) => {
      await rec.ok(`prepare ${key}`, call(lc, 'Prepare', { key: `${key}-tmp` , parent }));
      await rec.ok(`commit ${key}`, call(lc, 'Commit', { name: key, key: `${key}-tmp`, labels }));
    };
    await mk('ns/1/sha256:def', '', { [REF]: 'sha256:def' });
    await mk('ns/2/sha256:abc', 'ns/1/sha256:def', { [REF]: 'sha256:abc' });
    // Same ref label, different parent: must not match the parent clause.
    await mk('ns/3/sha256:abc', '', { [REF]: 'sha256:abc' });
    await rec.ok('prepare foo-1', call(lc, 'Prepare', { key: 'foo-1', parent: 'ns/2/sha256:abc' }));
    await rec.ok('view foo-2', call(lc, 'View', { key: 'foo-2', parent: 'ns/2/sha256:abc' }));
    await rec.ok('prepare barfoo', call(lc, 'Prepare', { key: 'barfoo', labels: { 'x.y/z': 'with space' } }));
  });

  after(async () => {
    lc?.close();
    if (ld) assert.equal(await ld.stop(), 0);
  });

  test('good input: no filter lists everything, with kinds and parents', async () => {
    const all = await listWithin(lc);
    rec.note('list all', 0);
    assert.deepEqual(names(all), ['barfoo', 'foo-1', 'foo-2', 'ns/1/sha256:def', 'ns/2/sha256:abc', 'ns/3/sha256:abc']);
    const byName = new Map(all.map((i) => [i.name, i]));
    assert.equal(byName.get('foo-2').kind, KIND.VIEW);
    assert.equal(byName.get('foo-1').kind, KIND.ACTIVE);
    assert.equal(byName.get('ns/2/sha256:abc').kind, KIND.COMMITTED);
    assert.equal(byName.get('ns/2/sha256:abc').parent, 'ns/1/sha256:def');
    assert.deepEqual(names(await listWithin(lc, [''])), names(all));
  });

  test("containerd's remote-snapshot lookup: ref label and parent", async () => {
    const got = await listWithin(lc, [`labels."${REF}"==sha256:abc,parent==ns/1/sha256:def`]);
    rec.note('list ref+parent', 0);
    assert.deepEqual(names(got), ['ns/2/sha256:abc']);
    assert.deepEqual(got[0].labels, { [REF]: 'sha256:abc' });
    assert.deepEqual(names(await listWithin(lc, [`labels."${REF}"==sha256:abc`])), ['ns/2/sha256:abc', 'ns/3/sha256:abc']);
    assert.deepEqual(names(await listWithin(lc, [`labels."${REF}"==sha256:nothing,parent==ns/1/sha256:def`])), []);
    assert.deepEqual(names(await listWithin(lc, [`labels."${REF}"`])), ['ns/1/sha256:def', 'ns/2/sha256:abc', 'ns/3/sha256:abc']);
    assert.deepEqual(names(await listWithin(lc, ['labels."x.y/z"=="with space"'])), ['barfoo']);
  });

  test('kind, name regexp, quoted values, !=', async () => {
    assert.deepEqual(names(await listWithin(lc, ['kind==committed'])), ['ns/1/sha256:def', 'ns/2/sha256:abc', 'ns/3/sha256:abc']);
    assert.deepEqual(names(await listWithin(lc, ['kind==view'])), ['foo-2']);
    assert.deepEqual(names(await listWithin(lc, ['kind==active'])), ['barfoo', 'foo-1']);
    assert.deepEqual(names(await listWithin(lc, ['name~=^foo'])), ['foo-1', 'foo-2']);
    assert.deepEqual(names(await listWithin(lc, ['name~="^ns/[12]/"'])), ['ns/1/sha256:def', 'ns/2/sha256:abc']);
    assert.deepEqual(names(await listWithin(lc, ['name=="foo-1"'])), ['foo-1']);
    assert.deepEqual(names(await listWithin(lc, ['kind!=committed,name~=foo'])), ['barfoo', 'foo-1', 'foo-2']);
    assert.deepEqual(names(await listWithin(lc, ['parent==ns/2/sha256:abc'])), ['foo-1', 'foo-2']);
    rec.note('list kinds', 0);
  });

  test('several filters are OR-ed', async () => {
    assert.deepEqual(names(await listWithin(lc, ['name==barfoo', 'kind==view'])), ['barfoo', 'foo-2']);
    assert.deepEqual(
      names(await listWithin(lc, [`labels."${REF}"==sha256:def`, 'name~=^foo', 'name==does-not-exist'])),
      ['foo-1', 'foo-2', 'ns/1/sha256:def'],
    );
    rec.note('list or', 0);
  });

  test('malformed filters are INVALID_ARGUMENT', async () => {
    const bad = [
      'name==',
      'name~=(',
      '==foo',
      'labels."unterminated==x',
      'name==a b',
      'name==a,',
      ',name==a',
      'name=="bad \\q escape"',
      'name&&a',
    ];
    for (const f of bad) {
      await rec.fails(`list filter ${JSON.stringify(f)}`, listWithin(lc, [f]), status.INVALID_ARGUMENT, ['filter']);
    }
    // One bad alternative fails the whole request, even if another one is fine.
    await rec.fails('list good and bad', listWithin(lc, ['kind==view', 'name~=[']), status.INVALID_ARGUMENT);
    // The daemon still answers.
    assert.equal((await listWithin(lc, ['kind==view'])).length, 1);
  });
});

describe('Cleanup', () => {
  test('removes directories no row names and keeps live snapshots', async () => {
    const prepared = await rec.ok('prepare cl-live', call(c, 'Prepare', { key: 'cl-live' }));
    const upper = upperDirOf(prepared.mounts);
    fs.writeFileSync(path.join(upper, 'keep-me'), 'data');
    await committed('cl-committed');
    const dirsBefore = snapshotDirs(d.root);

    const snaps = path.join(d.root, 'snapshots');
    fs.mkdirSync(path.join(snaps, '987654321', 'fs', 'deep'), { recursive: true });
    fs.writeFileSync(path.join(snaps, '987654321', 'fs', 'deep', 'file'), 'x');
    fs.mkdirSync(path.join(snaps, 'new-deadbeef', 'fs'), { recursive: true });
    fs.mkdirSync(path.join(snaps, 'rm-12345'));
    fs.writeFileSync(path.join(snaps, 'stray-file'), 'y');
    // An image no layer row names (a conversion interrupted before its commit).
    fs.mkdirSync(path.join(d.root, 'images'), { recursive: true });
    fs.writeFileSync(path.join(d.root, 'images', '987654321.erofs'), 'not an image');

    await rec.ok('cleanup', call(c, 'Cleanup', {}));
    assert.deepEqual(snapshotDirs(d.root), dirsBefore);
    assert.equal(fs.readFileSync(path.join(upper, 'keep-me'), 'utf8'), 'data');
    assert.equal((await stat(c, 'cl-live')).info.kind, KIND.ACTIVE);
    assert.equal((await stat(c, 'cl-committed')).info.kind, KIND.COMMITTED);
    await rec.ok('cleanup again', call(c, 'Cleanup', {}));
    assert.deepEqual(snapshotDirs(d.root), dirsBefore);
    assertOnlyNumericDirs(d.root, 'after cleanup');
  });
});

describe('keys that look like paths', () => {
  const weird = [
    '../../escape',
    '../',
    '..',
    '.',
    '/',
    '/etc/passwd',
    'a/b/c',
    'with space',
    ' ',
    'new-abc',
    'rm-1',
    '1',
    'tab\tand\nnewline',
    'ünïcødé ☃',
    'k'.repeat(4000),
  ];

  test('never name a path, and round-trip through Prepare, Stat, Commit, Prepare-on-parent, List, Remove', async () => {
    const outside = path.resolve(d.root, 'snapshots', '../../escape');
    for (const key of weird) {
      const what = JSON.stringify(key.length > 40 ? `${key.slice(0, 20)}…(${key.length})` : key);
      const res = await rec.ok(`prepare ${what}`, call(c, 'Prepare', { key }));
      assert.match(upperDirOf(res.mounts), new RegExp(`^${d.root}/snapshots/[0-9]+/fs$`), what);
      assertOnlyNumericDirs(d.root, `after prepare ${what}`);
      assert.equal((await rec.ok(`stat ${what}`, stat(c, key))).info.name, key);
      const name = `${key}#committed`;
      await rec.ok(`commit ${what}`, call(c, 'Commit', { name, key }));
      const child = await rec.ok(`prepare on ${what}`, call(c, 'Prepare', { key: `${key}#child`, parent: name }));
      assert.equal(child.mounts[0].type, 'overlay');
      assert.equal((await stat(c, `${key}#child`)).info.parent, name);
      const listed = await listWithin(c, [`name==${JSON.stringify(name)}`]);
      assert.deepEqual(
        listed.map((i) => i.name),
        [name],
        `List by quoted name ${what}`,
      );
      assertOnlyNumericDirs(d.root, `after commit ${what}`);
      await rec.ok(`remove child ${what}`, call(c, 'Remove', { key: `${key}#child` }));
      await rec.ok(`remove ${what}`, call(c, 'Remove', { key: name }));
      await rec.fails(`stat removed ${what}`, stat(c, name), status.NOT_FOUND);
      assert.ok(!fs.existsSync(outside), `a path outside ROOT/snapshots was created for ${what}`);
    }
    assert.ok(!fs.existsSync('/etc/passwd#committed'));
    assertOnlyNumericDirs(d.root, 'after all weird keys');
  });

  test('NUL bytes and keys over the 4096-byte limit are INVALID_ARGUMENT', async () => {
    const dirsBefore = snapshotDirs(d.root);
    await rec.fails('prepare NUL', call(c, 'Prepare', { key: 'a\0b' }), status.INVALID_ARGUMENT);
    await rec.fails('prepare NUL parent', call(c, 'Prepare', { key: 'nul-parent', parent: 'a\0b' }), status.INVALID_ARGUMENT);
    await rec.fails('view NUL', call(c, 'View', { key: '\0' }), status.INVALID_ARGUMENT);
    await rec.fails('stat NUL', stat(c, 'x\0'), status.INVALID_ARGUMENT);
    await rec.ok('prepare nul-src', call(c, 'Prepare', { key: 'nul-src' }));
    await rec.fails('commit NUL name', call(c, 'Commit', { name: 'n\0', key: 'nul-src' }), status.INVALID_ARGUMENT);
    await rec.fails('prepare 5000-byte key', call(c, 'Prepare', { key: 'k'.repeat(5000) }), status.INVALID_ARGUMENT);
    await rec.fails('stat 5000-byte key', stat(c, 'k'.repeat(5000)), status.INVALID_ARGUMENT);
    await rec.ok('remove nul-src', call(c, 'Remove', { key: 'nul-src' }));
    assert.deepEqual(snapshotDirs(d.root), dirsBefore);
  });
});

describe('malformed requests', () => {
  test('a client built from a different proto (ints where strings belong) gets a code, not UNKNOWN', async () => {
    const alien = alienClient(d.address);
    try {
      const keyed = { snapshotter: 7, key: 42, parent: 43, labels: [1, 2, 3] };
      for (const m of ['Prepare', 'View', 'Mounts', 'Remove', 'Stat', 'Usage']) {
        await rec.anyButUnknown(`alien ${m}`, alienCall(alien, m, keyed), true);
      }
      await rec.anyButUnknown('alien Commit', alienCall(alien, 'Commit', { name: 5, key: 1.5, labels: [9] }), true);
      await rec.anyButUnknown('alien Update', alienCall(alien, 'Update', { info: 'up-a', update_mask: 3 }), true);
      await rec.anyButUnknown('alien Update junk info', alienCall(alien, 'Update', { info: '\u0001\u0002junk' }), true);
      await rec.anyButUnknown('alien List', alienList(alien, { filters: [1, 2, 3] }), true);
      await rec.anyButUnknown('alien Cleanup', alienCall(alien, 'Cleanup', { snapshotter: 1 }), false);
    } finally {
      alien.close();
    }
    assert.ok((await stat(c, 'p-good')).info, 'daemon still serves');
  });

  test('bytes that are not protobuf get a code, not UNKNOWN, on every method', async () => {
    const raw = rawClient(d.address);
    const garbage = [
      Buffer.from([0x0a]),
      Buffer.from([0x0f]),
      Buffer.from([0x13]),
      Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
      Buffer.from('this is not protobuf at all'),
    ];
    try {
      for (const bytes of garbage) {
        for (const m of UNARY_METHODS) {
          await rec.anyButUnknown(`raw ${m} ${bytes.toString('hex')}`, rawUnary(raw, m, bytes), true);
        }
        await rec.anyButUnknown(`raw List ${bytes.toString('hex')}`, rawList(raw, bytes), true);
      }
      // Wrong wire types for the key and a truncated length: decoded leniently, still answered.
      for (const bytes of [Buffer.from([0x10, 0x05]), Buffer.from([0x12, 0xff, 0xff, 0xff, 0xff, 0x0f])]) {
        await rec.anyButUnknown(`raw Stat ${bytes.toString('hex')}`, rawUnary(raw, 'Stat', bytes), true);
      }
      // A method the service does not have.
      const code = await rec.anyButUnknown('raw unknown method', rawUnary(raw, 'Explode', Buffer.alloc(0)), true);
      assert.equal(code, status.UNIMPLEMENTED);
      // An empty body is a valid (all-default) CleanupRequest.
      const empty = await rawUnary(raw, 'Cleanup', Buffer.alloc(0));
      assert.equal(empty.length, 0);
    } finally {
      raw.close();
    }
    assert.equal(d.proc.exitCode, null, 'daemon died');
    await rec.ok('daemon still serves', stat(c, 'p-good'));
    await rec.ok('daemon still prepares', call(c, 'Prepare', { key: 'after-garbage' }));
  });
});

describe('concurrency', () => {
  let cd: DaemonProcess;
  const clients: SnapshotsClient[] = [];
  const N_CLIENTS = 5;
  const N_SNAPSHOTS = 40;

  before(async () => {
    cd = await startDaemon({ convertMode: 'sync', env: { LOG_LEVEL: 'info' } });
    for (let i = 0; i < N_CLIENTS; i++) clients.push(snapshotsClient(cd.address, `ns${i}`));
  });

  after(async () => {
    for (const cl of clients) cl.close();
    if (cd) assert.equal(await cd.stop(), 0, cd.output().slice(-4000));
  });

  test(`${N_CLIENTS} clients × ${N_SNAPSHOTS} snapshots: races on one key have one winner, chains all commit`, async () => {
    const expected = new Map<string, { kind: number; parent: string }>();

    // 1. Every client prepares the same key at once: exactly one wins.
    await Promise.all(
      Array.from({ length: N_SNAPSHOTS }, async (_, i) => {
        const key = `race-${i}`;
        const results = await Promise.allSettled(clients.map((cl) => call(cl, 'Prepare', { key })));
        const wins = results.filter((r) => r.status === 'fulfilled');
        assert.equal(wins.length, 1, `${key}: ${wins.length} Prepares succeeded`);
        for (const r of results) {
          if (r.status === 'rejected') {
            rec.note(`race prepare ${key}`, r.reason.code);
            assert.equal(r.reason.code, status.ALREADY_EXISTS, `${key}: ${r.reason.details}`);
          } else {
            rec.note(`race prepare ${key}`, 0);
          }
        }
        expected.set(key, { kind: KIND.ACTIVE, parent: '' });
      }),
    );

    // 2. Each client builds its own chain of N_SNAPSHOTS layers, all clients at once,
    //    writing into each active layer and asking its usage before committing.
    await Promise.all(
      clients.map(async (cl, ci) => {
        let parent = '';
        for (let i = 0; i < N_SNAPSHOTS; i++) {
          const key = `chain-${ci}-active-${i}`;
          const name = `chain-${ci}-layer-${i}`;
          const res = await rec.ok(`prepare ${key}`, call(cl, 'Prepare', { key, parent }));
          fs.writeFileSync(path.join(upperDirOf(res.mounts), `file-${i}`), `${ci}/${i}`);
          const u = await rec.ok(`usage ${key}`, call(cl, 'Usage', { key }));
          assert.equal(Number(u.inodes), 2, `${key}: ${JSON.stringify(u)}`);
          await rec.ok(`commit ${name}`, call(cl, 'Commit', { name, key, labels: { [REF]: `sha256:${ci}-${i}` } }));
          expected.set(name, { kind: KIND.COMMITTED, parent });
          parent = name;
        }
      }),
    );

    // 3. Every client commits the same active key under its own name: one wins,
    //    the others find the key gone.
    await Promise.all(
      Array.from({ length: 10 }, async (_, i) => {
        const key = `rc-${i}`;
        await rec.ok(`prepare ${key}`, call(clients[0], 'Prepare', { key }));
        const results = await Promise.allSettled(
          clients.map((cl, ci) => call(cl, 'Commit', { name: `rc-${i}-by-${ci}`, key })),
        );
        const winners = results.flatMap((r, ci) => (r.status === 'fulfilled' ? [ci] : []));
        assert.equal(winners.length, 1, `${key}: ${winners.length} commits succeeded`);
        for (const r of results) {
          const code = r.status === 'fulfilled' ? 0 : r.reason.code;
          rec.note(`race commit ${key}`, code);
          if (r.status === 'rejected') assert.equal(code, status.NOT_FOUND, `${key}: ${r.reason.details}`);
        }
        expected.set(`rc-${i}-by-${winners[0]}`, { kind: KIND.COMMITTED, parent: '' });
      }),
    );

    // 4. Same name from every client: one wins, the rest are ALREADY_EXISTS or NOT_FOUND.
    await Promise.all(
      Array.from({ length: 10 }, async (_, i) => {
        const results = await Promise.allSettled(
          clients.map(async (cl, ci) => {
            await call(cl, 'Prepare', { key: `same-${i}-${ci}` });
            await call(cl, 'Commit', { name: `same-${i}`, key: `same-${i}-${ci}` });
            return ci;
          }),
        );
        const winners = results.filter((r) => r.status === 'fulfilled');
        assert.equal(winners.length, 1, `same-${i}: ${winners.length} commits succeeded`);
        for (const r of results) {
          if (r.status === 'rejected') {
            rec.note(`same-name commit ${i}`, r.reason.code);
            assert.equal(r.reason.code, status.ALREADY_EXISTS, r.reason.details);
          }
        }
        expected.set(`same-${i}`, { kind: KIND.COMMITTED, parent: '' });
        for (let ci = 0; ci < N_CLIENTS; ci++) {
          if (ci !== (winners[0] as PromiseFulfilledResult<number>).value) {
            expected.set(`same-${i}-${ci}`, { kind: KIND.ACTIVE, parent: '' });
          }
        }
      }),
    );

    // 5. Remove racing with Commit and Usage on the same actives.
    await Promise.all(
      Array.from({ length: 30 }, async (_, i) => {
        const key = `rm-race-${i}`;
        await rec.ok(`prepare ${key}`, call(clients[1], 'Prepare', { key }));
        const [commit, remove, usage] = await Promise.allSettled([
          call(clients[2], 'Commit', { name: `${key}-c`, key }),
          call(clients[3], 'Remove', { key }),
          call(clients[4], 'Usage', { key }),
        ]);
        for (const r of [commit, remove, usage]) {
          const code = r.status === 'fulfilled' ? 0 : r.reason.code;
          rec.note(`remove race ${key}`, code);
          assert.ok([0, status.NOT_FOUND].includes(code), `${key}: code ${code} ${r.status === 'rejected' ? r.reason.details : ''}`);
        }
        if (commit.status === 'fulfilled' && remove.status === 'rejected') {
          expected.set(`${key}-c`, { kind: KIND.COMMITTED, parent: '' });
        } else {
          assert.equal(remove.status, 'fulfilled', `${key}: neither commit nor remove won`);
          // Remove may run after the commit renamed the key (NOT_FOUND) or before it.
          assert.equal(commit.status, 'rejected', `${key}: both commit and remove succeeded`);
        }
      }),
    );

    // The final listing is exactly what succeeded, from any client.
    const infos = await listWithin(clients[4]);
    const got = new Map(infos.map((i) => [i.name, { kind: i.kind, parent: i.parent }]));
    assert.deepEqual(
      [...got.keys()].sort(),
      [...expected.keys()].sort(),
      'List does not match the calls that succeeded',
    );
    for (const [name, want] of expected) assert.deepEqual(got.get(name), want, name);
    for (let ci = 0; ci < N_CLIENTS; ci++) {
      const chain = await listWithin(clients[ci], [`name~=^chain-${ci}-layer-,kind==committed`]);
      assert.equal(chain.length, N_SNAPSHOTS);
      const top = await call(clients[ci], 'Stat', { key: `chain-${ci}-layer-${N_SNAPSHOTS - 1}` });
      assert.deepEqual(top.info.labels, { [REF]: `sha256:${ci}-${N_SNAPSHOTS - 1}` });
    }
    // One directory per snapshot, all named by id.
    assertOnlyNumericDirs(cd.root, 'after the races');
    assert.equal(snapshotDirs(cd.root).length, expected.size);
    // Usage on every surviving active snapshot works.
    for (const [name, want] of expected) {
      if (want.kind === KIND.ACTIVE) await rec.ok(`usage ${name}`, call(clients[0], 'Usage', { key: name }));
    }
  });
});

test('no answer in this file was UNKNOWN', () => {
  assert.ok(rec.seen.length > 200, `only ${rec.seen.length} answers recorded`);
  const unknown = rec.seen.filter((s) => s.code === status.UNKNOWN);
  assert.deepEqual(unknown, []);
  const codes = new Set(rec.seen.map((s) => s.code));
  for (const want of [0, status.INVALID_ARGUMENT, status.NOT_FOUND, status.ALREADY_EXISTS, status.FAILED_PRECONDITION]) {
    assert.ok(codes.has(want), `no case answered ${status[want]}`);
  }
});
