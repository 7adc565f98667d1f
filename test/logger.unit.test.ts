/**
 * Log lines: `grep ERROR` finds error lines (the `severity` field) while
 * each line stays one JSON object; on journald's stream each line starts
 * with its syslog priority (journald strips it and keeps it as the
 * entry's priority), anywhere else it does not.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { createLogger, withPriorityPrefix } from '../src/log/logger';
import { tempDir } from './helpers/daemon';

function capture(): { lines: string[]; dest: { write(s: string): void } } {
  const lines: string[] = [];
  return { lines, dest: { write: (s: string) => void lines.push(s) } };
}

describe('log lines', () => {
  test('each level carries severity in upper case: grep ERROR matches error lines only; jq still reads level', () => {
    const c = capture();
    const log = createLogger('debug', c.dest);
    log.info({ op: 'convert' }, 'converted');
    log.warn({ op: 'convert' }, 'slow');
    log.error({ op: 'convert', err: 'mkfs.erofs: not found' }, 'auto-convert of layer 7 to EROFS failed');
    const objs = c.lines.map((l) => JSON.parse(l));
    assert.deepEqual(objs.map((o) => [o.level, o.severity]), [['info', 'INFO'], ['warn', 'WARN'], ['error', 'ERROR']]);
    assert.deepEqual(c.lines.filter((l) => /ERROR/.test(l)).length, 1);
    assert.match(c.lines.filter((l) => /ERROR/.test(l))[0], /auto-convert of layer 7/);
  });

  test('withPriorityPrefix: <3> for error, <4> warn, <6> info, <2> fatal, then the JSON line', () => {
    const c = capture();
    const log = createLogger('info', withPriorityPrefix(c.dest));
    log.info('a');
    log.warn('b');
    log.error('c');
    log.fatal('d');
    assert.deepEqual(c.lines.map((l) => l.slice(0, 3)), ['<6>', '<4>', '<3>', '<2>']);
    for (const l of c.lines) JSON.parse(l.slice(3));
  });

  test("the prefix only when stdout is journald's stream (JOURNAL_STREAM names fd 1's device and inode)", () => {
    const dir = tempDir('logger');
    const script = path.join(dir, 'log.js');
    const logger = path.resolve(__dirname, '../src/log/logger.js');
    fs.writeFileSync(script, `require(${JSON.stringify(logger)}).createLogger('info').error({ op: 'x' }, 'boom');\n`);
    const run = (streamOf: (file: string) => string | undefined) => {
      const out = path.join(dir, `out-${Math.random()}`);
      const fd = fs.openSync(out, 'w');
      const st = fs.fstatSync(fd);
      const env = { ...process.env };
      delete env.JOURNAL_STREAM;
      const js = streamOf(`${st.dev}:${st.ino}`);
      if (js !== undefined) env.JOURNAL_STREAM = js;
      const r = spawnSync(process.execPath, [script], { stdio: ['ignore', fd, 'pipe'], env });
      fs.closeSync(fd);
      assert.equal(r.status, 0, String(r.stderr));
      return fs.readFileSync(out, 'utf8');
    };
    assert.match(run((mine) => mine), /^<3>\{"level":"error","severity":"ERROR"/);
    assert.match(run(() => undefined), /^\{"level":"error"/);
    // Set by systemd for a stream, but stdout was redirected elsewhere: no prefix.
    assert.match(run(() => '1:2'), /^\{"level":"error"/);
  });
});
