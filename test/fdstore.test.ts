/**
 * Issue 12: systemd's fd store as the third holder of the fanotify group.
 *
 * - The protocol pieces: sd_notify with fds (SCM_RIGHTS) to a socket this
 *   test binds, sd_listen_fds in a process started as systemd starts one
 *   (fds from 3 on, LISTEN_PID its own), and how a group handed back is
 *   checked (anything but a pre-content fanotify group is closed, never
 *   used). Without NOTIFY_SOCKET nothing is sent; a socket that refuses
 *   fds costs one warning.
 * - With the real daemon, holder, registry and kernel, this test playing
 *   systemd: the daemon stores its copy of the group on NOTIFY_SOCKET; kill
 *   -9 of daemon and holder together while readers wait on a lazy file
 *   (the copy this test holds keeps the group, so they keep waiting); the
 *   daemon started again with that copy as fd 3 (LISTEN_FDS) takes it back
 *   and every reader gets the image's bytes: nothing was let through,
 *   nothing is remounted. A restart of the daemon alone (the holder alive)
 *   hands back the holder's own group: nothing is stored again. A group
 *   handed back that guards nothing is let go.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { FAN_CLASS_NOTIF, FAN_CLASS_PRE_CONTENT, FAN_CLOEXEC, FAN_MARK_ADD, FAN_NONBLOCK, FAN_PRE_ACCESS, O_LARGEFILE, O_RDONLY, O_RDWR, closeFd, fanotifyGroupInfo, fanotifyInit, fanotifyMark, kernelDev } from '../native/fanotify';
import { sameOpenFile } from '../native/libc';
import { type Datagram, UnixDatagramReceiver } from '../native/socket';
import { createLogger } from '../src/log/logger';
import { GROUP_FDNAME, GroupFdStore, takeStoredGroup } from '../src/ondemand/fdstore';
import { RegistryClient } from '../src/remote/registry';
import { sdNotify, sdNotifyWithFds } from '../src/systemd/notify';
import { type DaemonProcess, cleanupDaemons, startDaemon, tempDir, waitFor } from './helpers/daemon';
import { type LazyLayer, lazyImage as makeLazyImage, lazyPrepare as prepareLazily, readInChild, sha256 } from './helpers/ondemand';
import { type RealRegistry, type RegistryProxy, startRegistry, startRegistryProxy } from './helpers/registry';

const [major, minor] = os.release().split('.').map(Number);
const skip = major > 6 || (major === 6 && minor >= 14) ? false : `fanotify pre-content events need Linux >= 6.14 (this is ${os.release()})`;
const MiB = 1 << 20;
const NOTIFY_JS = path.join(__dirname, '..', 'src', 'systemd', 'notify.js');

/** Every datagram waiting on `rx` (the fds they carry are the caller's to close). */
function drain(rx: UnixDatagramReceiver, into: Datagram[]): Datagram[] {
  for (let d = rx.tryReceiveWithFds(); d !== null; d = rx.tryReceiveWithFds()) into.push(d);
  return into;
}

const lines = (d: Datagram) => d.message.split('\n');

function capture(): { logger: ReturnType<typeof createLogger>; logs: () => Record<string, unknown>[] } {
  let out = '';
  const logger = createLogger('debug', { write: (line: string) => void (out += line) });
  return { logger, logs: () => out.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>) };
}

function preContentGroup(): number {
  return fanotifyInit(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE);
}

describe('the protocol', () => {
  test('sd_notify with fds: the message as KEY=value lines, the fd the same open file on the other side; nothing without NOTIFY_SOCKET', () => {
    const dir = tempDir('fdstore-msg');
    const sock = path.join(dir, 'notify.sock');
    const rx = new UnixDatagramReceiver(sock);
    const file = path.join(dir, 'f');
    fs.writeFileSync(file, 'x');
    const fd = fs.openSync(file, 'r');
    const got: Datagram[] = [];
    try {
      assert.equal(sdNotifyWithFds({ FDSTORE: 1, FDNAME: 'one' }, [fd, fd], { NOTIFY_SOCKET: sock }), true);
      assert.equal(sdNotify({ READY: 1 }, { NOTIFY_SOCKET: sock }), true);
      drain(rx, got);
      assert.equal(got.length, 2);
      assert.deepEqual(lines(got[0]), ['FDSTORE=1', 'FDNAME=one']);
      assert.equal(got[0].fds.length, 2);
      assert.equal(got[0].truncated, false);
      for (const f of got[0].fds) {
        assert.equal(sameOpenFile(f, fd), true, 'the same open file, not just the same path');
        assert.notEqual(f, fd);
        // The receiver's copies are close-on-exec (MSG_CMSG_CLOEXEC).
        const flags = /flags:\s+([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${f}`, 'utf8'))?.[1] ?? '0';
        assert.ok((parseInt(flags, 8) & 0o2000000) !== 0, `fd ${f} flags ${flags}`);
      }
      assert.deepEqual(got[1], { message: 'READY=1', fds: [], truncated: false });
      assert.equal(sdNotifyWithFds({ FDSTORE: 1 }, [fd], {}), false, 'no NOTIFY_SOCKET: nothing sent');
      assert.equal(rx.tryReceiveWithFds(), null);
    } finally {
      for (const d of got) for (const f of d.fds) closeFd(f);
      fs.closeSync(fd);
      rx.close();
    }
  });

  test('sd_listen_fds: fds from 3 with their names, FD_CLOEXEC set, LISTEN_* removed; none when LISTEN_PID is another process', async () => {
    const dir = tempDir('fdstore-listen');
    fs.writeFileSync(path.join(dir, 'a'), 'a');
    fs.writeFileSync(path.join(dir, 'b'), 'b');
    const a = fs.openSync(path.join(dir, 'a'), 'r');
    const b = fs.openSync(path.join(dir, 'b'), 'r');
    const script = `const n=require(${JSON.stringify(NOTIFY_JS)}),fs=require('fs');const got=n.sdListenFds();process.stdout.write(JSON.stringify({got,env:[process.env.LISTEN_PID,process.env.LISTEN_FDS,process.env.LISTEN_FDNAMES],links:got.map(f=>fs.readlinkSync('/proc/self/fd/'+f.fd)),flags:got.map(f=>/flags:\\s+([0-7]+)/.exec(fs.readFileSync('/proc/self/fdinfo/'+f.fd,'utf8'))[1])}))`;
    const run = async (pidExpr: string) => {
      const p = spawn('/bin/sh', ['-c', `LISTEN_PID=${pidExpr}; export LISTEN_PID; exec "$@"`, 'sh', process.execPath, '-e', script], {
        env: { PATH: process.env.PATH, LISTEN_FDS: '2', LISTEN_FDNAMES: 'first:second' },
        stdio: ['ignore', 'pipe', 'inherit', a, b],
      });
      let out = '';
      p.stdout?.on('data', (d) => (out += d));
      await new Promise((r) => p.once('exit', r));
      return JSON.parse(out) as { got: { fd: number; name: string }[]; env: unknown[]; links: string[]; flags: string[] };
    };
    try {
      const mine = await run('$$');
      assert.deepEqual(mine.got, [
        { fd: 3, name: 'first' },
        { fd: 4, name: 'second' },
      ]);
      assert.deepEqual(mine.links, [path.join(dir, 'a'), path.join(dir, 'b')]);
      for (const f of mine.flags) assert.ok((parseInt(f, 8) & 0o2000000) !== 0, `FD_CLOEXEC set (flags ${f})`);
      assert.deepEqual(mine.env, [null, null, null], 'LISTEN_* unset: children do not inherit them');
      const other = await run('1');
      assert.deepEqual(other.got, [], 'LISTEN_PID of another process: not ours');
      assert.deepEqual(other.env, [null, null, null]);
    } finally {
      fs.closeSync(a);
      fs.closeSync(b);
    }
  });

  test('the group is stored once (the name removed first), again only when replaced; a socket refusing fds is one warning', { skip }, () => {
    const dir = tempDir('fdstore-keep');
    const sock = path.join(dir, 'notify.sock');
    const rx = new UnixDatagramReceiver(sock);
    const group = preContentGroup();
    const got: Datagram[] = [];
    const { logger, logs } = capture();
    try {
      const store = new GroupFdStore({ env: { NOTIFY_SOCKET: sock, FDSTORE: '4' }, logger });
      assert.equal(store.enabled, true);
      assert.equal(store.keep(group, 'test'), true);
      assert.equal(store.keep(group, 'test'), false, 'held already: not sent twice');
      drain(rx, got);
      assert.deepEqual(
        got.map((d) => [lines(d), d.fds.length]),
        [
          [['FDSTOREREMOVE=1', `FDNAME=${GROUP_FDNAME}`], 0],
          [['FDSTORE=1', `FDNAME=${GROUP_FDNAME}`, 'FDPOLL=0'], 1],
        ],
      );
      assert.equal(sameOpenFile(got[1].fds[0], group), true);
      const info = logs().filter((l) => l.op === 'ondemand' && l.level === 'info');
      assert.equal(info.length, 1);
      assert.equal(info[0].fdstore_max, '4');
      assert.equal(store.keep(group, 'another group', true), true, 'replaced: sent again');
      assert.equal(drain(rx, got).length, 4);

      assert.equal(new GroupFdStore({ env: {}, logger }).keep(group, 'test'), false, 'no NOTIFY_SOCKET: nothing');
      assert.equal(drain(rx, got).length, 4);

      const refusing = new UnixDatagramReceiver(path.join(dir, 'refusing.sock'));
      try {
        if (!refusing.refuseFds()) return; // a kernel before 6.16: no SO_PASSRIGHTS
        const store2 = new GroupFdStore({ env: { NOTIFY_SOCKET: refusing.address }, logger });
        assert.equal(store2.keep(group, 'test'), false);
        assert.equal(store2.keep(group, 'test'), false);
        const warns = logs().filter((l) => l.level === 'warn' && /fd store did not take the fanotify group/.test(String(l.msg)));
        assert.equal(warns.length, 1, 'one warning, not one per try');
        assert.match(String(warns[0].err), /EPERM/);
      } finally {
        refusing.close();
      }
    } finally {
      for (const d of got) for (const f of d.fds) closeFd(f);
      closeFd(group);
      rx.close();
    }
  });

  test('a group handed back: used only when it is a pre-content fanotify group; anything else closed with a warning and removed from the store', { skip }, () => {
    const dir = tempDir('fdstore-take');
    const sock = path.join(dir, 'notify.sock');
    const rx = new UnixDatagramReceiver(sock);
    const got: Datagram[] = [];
    const { logger, logs } = capture();
    const file = path.join(dir, 'plain');
    fs.writeFileSync(file, 'x');
    const isOpen = (fd: number) => fs.existsSync(`/proc/self/fdinfo/${fd}`);
    try {
      const store = new GroupFdStore({ env: { NOTIFY_SOCKET: sock }, logger });
      const plain = fs.openSync(file, 'r');
      const notif = fanotifyInit(FAN_CLASS_NOTIF | FAN_CLOEXEC, O_RDONLY);
      const group = preContentGroup();
      fanotifyMark(group, FAN_MARK_ADD, FAN_PRE_ACCESS, file);
      const other = fs.openSync(file, 'r');
      const fds = [
        { fd: plain, name: GROUP_FDNAME },
        { fd: notif, name: GROUP_FDNAME },
        { fd: other, name: 'something-else' },
        { fd: group, name: GROUP_FDNAME },
      ];
      assert.equal(takeStoredGroup(fds, store, true, logger), group);
      for (const fd of [plain, notif, other]) assert.equal(isOpen(fd), false, `fd ${fd} closed`);
      assert.equal(isOpen(group), true);
      const warned = logs().filter((l) => l.level === 'warn');
      assert.ok(warned.some((l) => l.fd === plain && /not a fanotify group/.test(String(l.err))), JSON.stringify(warned));
      assert.ok(warned.some((l) => l.fd === notif && /not pre-content/.test(String(l.err))), JSON.stringify(warned));
      assert.ok(warned.some((l) => l.fd === other));
      // The bad ones share the name: it is removed, and the group stored again once in use.
      drain(rx, got);
      assert.deepEqual(got.map(lines), [['FDSTOREREMOVE=1', `FDNAME=${GROUP_FDNAME}`]]);
      assert.equal(store.keep(group, 'in use'), true);
      // Its marks, as the kernel lists them, name the file.
      const st = fs.statSync(file, { bigint: true });
      const marks = fanotifyGroupInfo(group)?.marks ?? [];
      assert.ok(marks.some((m) => m.ino === st.ino && m.sdev === kernelDev(st.dev) && (m.mask & BigInt(FAN_PRE_ACCESS)) !== 0n), JSON.stringify(marks, (_, v) => (typeof v === 'bigint' ? v.toString() : v)));

      // No fanotify backend: the group is given up, and the store told.
      const unwanted = preContentGroup();
      drain(rx, got).splice(0);
      assert.equal(takeStoredGroup([{ fd: unwanted, name: GROUP_FDNAME }], store, false, logger), -1);
      assert.equal(isOpen(unwanted), false);
      assert.deepEqual(drain(rx, []).map(lines), [['FDSTOREREMOVE=1', `FDNAME=${GROUP_FDNAME}`]]);
      closeFd(group);
    } finally {
      for (const d of got) for (const f of d.fds) closeFd(f);
      rx.close();
    }
  });
});

describe('the daemon and systemd', { skip }, () => {
  let registry: RealRegistry;
  let proxy: RegistryProxy;
  let client: RegistryClient;
  let dir: string;

  before(async () => {
    registry = await startRegistry();
    proxy = await startRegistryProxy(registry.host);
    client = new RegistryClient({ plainHttpHosts: [registry.host] });
    dir = tempDir('fdstore');
  });

  after(async () => {
    await cleanupDaemons();
    client?.close();
    await proxy?.stop();
    await registry?.stop();
  });

  const lazyImage = (name: string, size: number) => makeLazyImage({ registry, proxy, client, dir }, name, size);
  const lazyPrepare = (d: DaemonProcess, l: LazyLayer) => prepareLazily(d, l, 'fanotify');
  const options = (extra: Parameters<typeof startDaemon>[0] = {}) => ({
    dir,
    ...extra,
    config: { registry: { plain_http_hosts: [proxy.host] }, ondemand: { backend: 'fanotify' } },
  });
  const holderPid = (root: string) => Number(fs.readFileSync(path.join(root, 'ondemand', 'holder.pid'), 'utf8'));

  test('kill -9 of daemon and holder together while readers wait: the fd store keeps the group, the restarted daemon takes it back, every reader gets the right bytes', async () => {
    const l = await lazyImage('fds-both', 2 * MiB);
    const sock = path.join(dir, 'notify.sock');
    const rx = new UnixDatagramReceiver(sock);
    const got: Datagram[] = [];
    let stored = -1;
    try {
      const d = await startDaemon(options({ env: { NOTIFY_SOCKET: sock } }));
      const id = await lazyPrepare(d, l);
      const lazyFile = path.join(d.root, 'lazy', `${id}.blob`);
      await waitFor(() => drain(rx, got).some((m) => lines(m).includes('FDSTORE=1')), 10_000, 'FDSTORE=1');
      const stores = got.filter((m) => lines(m).includes('FDSTORE=1'));
      assert.equal(stores.length, 1, 'one stored copy');
      assert.deepEqual(lines(stores[0]), ['FDSTORE=1', `FDNAME=${GROUP_FDNAME}`, 'FDPOLL=0']);
      assert.equal(stores[0].fds.length, 1);
      // Removed by name first (the store may hold a group lost earlier).
      const removeAt = got.findIndex((m) => lines(m).includes('FDSTOREREMOVE=1'));
      assert.ok(removeAt >= 0 && removeAt < got.indexOf(stores[0]));
      stored = stores[0].fds[0];
      for (const m of got) for (const f of m.fds) if (f !== stored) closeFd(f);
      // This test now holds a copy, as systemd would: the group, with the lazy file marked.
      const st = fs.statSync(lazyFile, { bigint: true });
      assert.ok(fanotifyGroupInfo(stored)?.marks.some((m) => m.ino === st.ino && m.sdev === kernelDev(st.dev)), 'the stored group marks the lazy file');
      const line = d.logs().find((x) => x.op === 'ondemand' && /stored the fanotify group in systemd's fd store/.test(String(x.msg)));
      assert.equal(line?.level, 'info');

      proxy.mode = 'hold';
      const mnt = path.join(d.root, 'mnt', id, 'data.bin');
      const readers = [readInChild(mnt), readInChild(mnt), readInChild(mnt)];
      await waitFor(() => proxy.held() > 0, 20_000, 'the reads reaching the registry');
      await new Promise((r) => setTimeout(r, 500));
      const holder = holderPid(d.root);
      const daemonDead = d.kill();
      process.kill(holder, 'SIGKILL');
      await daemonDead;
      await waitFor(() => !fs.existsSync(`/proc/${holder}`), 10_000, 'the holder gone');
      proxy.release();
      proxy.mode = 'pass';
      // No process but this test holds the group: the kernel keeps the reads waiting.
      await new Promise((r) => setTimeout(r, 2000));
      for (const r of readers) assert.equal(r.exited(), false, 'the reader still waits with daemon and holder dead');

      const d2 = await startDaemon(options({ root: d.root, address: d.address, env: { NOTIFY_SOCKET: sock }, listenFds: [{ fd: stored, name: GROUP_FDNAME }] }));
      const back = d2.logs().find((x) => x.op === 'ondemand' && /took the fanotify group back from systemd's fd store/.test(String(x.msg)));
      assert.equal(back?.level, 'info', 'one info line: taken back');
      const results = await Promise.all(readers.map((r) => r.done));
      for (const [i, h] of results.entries()) assert.equal(h, sha256(l.content), `reader ${i}: the image's bytes`);
      const served = d2.logs().filter((x) => x.op === 'ondemand' && /waited while the on-demand holder and the daemon were both dead is served/.test(String(x.msg)));
      assert.ok(served.length >= 1, 'reads the dead holder had taken are served, not denied');
      assert.ok(!d2.logs().some((x) => /denied \d+ reads/.test(String(x.msg))), 'none denied');
      // Held throughout: nothing was let through, nothing is mounted again.
      assert.ok(!d2.logs().some((x) => /fanotify group was lost/.test(String(x.msg))), 'no remount');
      assert.ok(d2.logs().some((x) => x.op === 'ondemand' && x.adopted === true), 'the new holder reads the group from the store');
      // The store holds this group already: not stored again.
      const after2 = drain(rx, []);
      assert.ok(!after2.some((m) => lines(m).includes('FDSTORE=1')), 'not stored a second time');
      for (const m of after2) for (const f of m.fds) closeFd(f);
      // The marks came back with the group: a read of the file through a fresh page cache still waits for data and gets it.
      fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
      assert.equal(await readInChild(mnt).done, sha256(l.content));
      assert.equal(await d2.stop(), 0);
    } finally {
      proxy.mode = 'pass';
      proxy.release();
      if (stored >= 0) closeFd(stored);
      rx.close();
    }
  });

  test('a restart of the daemon alone while a reader waits (systemctl restart): the group handed back is the live holder\'s, nothing is stored again', async () => {
    const l = await lazyImage('fds-restart', 1 * MiB);
    const sock = path.join(dir, 'notify-restart.sock');
    const rx = new UnixDatagramReceiver(sock);
    const got: Datagram[] = [];
    let stored = -1;
    try {
      const d = await startDaemon(options({ dir: tempDir('fdstore-restart'), env: { NOTIFY_SOCKET: sock } }));
      const id = await lazyPrepare(d, l);
      await waitFor(() => drain(rx, got).some((m) => lines(m).includes('FDSTORE=1')), 10_000, 'FDSTORE=1');
      stored = got.find((m) => lines(m).includes('FDSTORE=1'))?.fds[0] ?? -1;
      for (const m of got) for (const f of m.fds) if (f !== stored) closeFd(f);
      const holder = holderPid(d.root);
      proxy.mode = 'hold';
      const reader = readInChild(path.join(d.root, 'mnt', id, 'data.bin'));
      await waitFor(() => proxy.held() > 0, 20_000, 'the read reaching the registry');
      assert.equal(await d.stop(), 0);
      proxy.release();
      proxy.mode = 'pass';
      const d2 = await startDaemon(options({ root: d.root, address: d.address, env: { NOTIFY_SOCKET: sock }, listenFds: [{ fd: stored, name: GROUP_FDNAME }] }));
      assert.equal(await reader.done, sha256(l.content));
      assert.equal(holderPid(d2.root), holder, 'the same holder');
      assert.ok(d2.logs().some((x) => /took the fanotify group back/.test(String(x.msg))));
      assert.ok(!d2.logs().some((x) => /reads another fanotify group|fanotify group was lost|denied \d+ reads/.test(String(x.msg))), 'the same group, nothing lost or denied');
      const after2 = drain(rx, []);
      assert.ok(!after2.some((m) => lines(m).includes('FDSTORE=1') || lines(m).includes('FDSTOREREMOVE=1')), after2.map((m) => m.message).join(' | '));
      for (const m of after2) for (const f of m.fds) closeFd(f);
      assert.equal(await d2.stop(), 0);
    } finally {
      proxy.mode = 'pass';
      proxy.release();
      if (stored >= 0) closeFd(stored);
      rx.close();
    }
  });

  test('a group handed back that marks nothing, with no lazy layer left: let go and removed from the store, no holder started', async () => {
    const sock = path.join(dir, 'notify-idle.sock');
    const rx = new UnixDatagramReceiver(sock);
    const group = preContentGroup();
    try {
      const d = await startDaemon(options({ dir: tempDir('fdstore-idle'), env: { NOTIFY_SOCKET: sock }, listenFds: [{ fd: group, name: GROUP_FDNAME }] }));
      assert.ok(d.logs().some((x) => x.op === 'ondemand' && /took the fanotify group back/.test(String(x.msg))));
      const gone = d.logs().find((x) => x.op === 'ondemand' && /removed dedup-fanotify from systemd's fd store: no lazy layer is left/.test(String(x.msg)));
      assert.equal(gone?.level, 'info');
      const msgs = drain(rx, []);
      assert.ok(msgs.some((m) => lines(m).join() === `FDSTOREREMOVE=1,FDNAME=${GROUP_FDNAME}`));
      assert.ok(!msgs.some((m) => lines(m).includes('FDSTORE=1')));
      assert.equal(fs.existsSync(path.join(d.root, 'ondemand', 'holder.pid')), false, 'no holder for nothing');
      assert.equal(await d.stop(), 0);
    } finally {
      closeFd(group);
      rx.close();
    }
  });

  test('a NOTIFY_SOCKET that refuses fds: one warning, lazy reads served; a handed-back fd that is no fanotify group is closed, never used', async (t) => {
    const sock = path.join(dir, 'refusing.sock');
    const rx = new UnixDatagramReceiver(sock);
    if (!rx.refuseFds()) {
      rx.close();
      t.skip('SKIP: no SO_PASSRIGHTS (Linux < 6.16)');
      return;
    }
    const junk = path.join(dir, 'junk');
    fs.writeFileSync(junk, 'not a group');
    const fd = fs.openSync(junk, 'r');
    try {
      const l = await lazyImage('fds-refused', 1 * MiB);
      const d = await startDaemon(options({ dir: tempDir('fdstore-refused'), env: { NOTIFY_SOCKET: sock }, listenFds: [{ fd, name: GROUP_FDNAME }] }));
      const bad = d.logs().find((x) => x.op === 'ondemand' && /closed, never used/.test(String(x.msg)));
      assert.equal(bad?.level, 'warn');
      const id = await lazyPrepare(d, l);
      assert.equal(await readInChild(path.join(d.root, 'mnt', id, 'data.bin')).done, sha256(l.content));
      const warns = d.logs().filter((x) => /fd store did not take the fanotify group/.test(String(x.msg)));
      assert.equal(warns.length, 1);
      assert.equal(warns[0].level, 'warn');
      const msgs = drain(rx, []);
      assert.ok(msgs.some((m) => lines(m).includes('READY=1')), 'READY=1 still sent');
      assert.ok(msgs.some((m) => lines(m).join() === `FDSTOREREMOVE=1,FDNAME=${GROUP_FDNAME}`), 'the bad fd removed from the store');
      assert.ok(!msgs.some((m) => lines(m).includes('FDSTORE=1')));
      assert.equal(await d.stop(), 0);
    } finally {
      fs.closeSync(fd);
      rx.close();
    }
  });
});
