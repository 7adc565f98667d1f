/**
 * The fast lane (`npm run test:unit`: dist/test/*.unit.test.js) needs no
 * root: run as root, this test runs it again as an unprivileged user
 * (uid 65534, via setpriv) and fails if any of its tests fail. Cases that
 * need a privilege report SKIP with the reason.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

const distTest = path.resolve(__dirname);

test('the unit lane passes as an unprivileged user', { timeout: 20 * 60_000 }, (t) => {
  if (process.getuid?.() !== 0) return t.skip('SKIP: not root: this run is unprivileged already');
  const setpriv = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => fs.existsSync(p));
  if (!setpriv) return t.skip('SKIP: no setpriv (util-linux) to drop privileges');
  const files = fs.readdirSync(distTest).filter((f) => f.endsWith('.unit.test.js')).map((f) => path.join(distTest, f));
  assert.ok(files.length >= 4, `unit test files found: ${files.join(', ')}`);
  const r = spawnSync(setpriv, ['--reuid=65534', '--regid=65534', '--clear-groups', '--', process.execPath, '--test', '--test-concurrency=1', '--test-reporter=tap', ...files], {
    encoding: 'utf8',
    env: { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin', HOME: '/tmp', TMPDIR: '/tmp' },
    maxBuffer: 64 << 20,
  });
  const out = `${r.stdout}\n${r.stderr}`;
  const count = (k: string) => Number(new RegExp(`^# ${k} (\\d+)$`, 'm').exec(r.stdout)?.[1] ?? NaN);
  const failed = out.split('\n').filter((l) => /^\s*not ok /.test(l) && !/# SKIP/.test(l));
  assert.equal(r.status, 0, `the unit lane failed as uid 65534:\n${failed.join('\n')}\n${out.slice(-4000)}`);
  assert.equal(count('fail'), 0);
  assert.ok(count('pass') > 50, `passed: ${count('pass')}`);
  t.diagnostic(`as uid 65534: ${count('pass')} passed, ${count('skipped')} skipped (each names its reason)`);
});
