/**
 * Shared by the on-demand tests (fanotify on this kernel, fscache in the
 * ondemand VM): one-layer dedup images in a real registry, reached through
 * a proxy the tests can hold or break; Prepare as containerd's CRI does;
 * reads in a separate process.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import { LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST, LABEL_SNAPSHOT_REF } from '../../src/remote/lazy';
import type { RegistryClient } from '../../src/remote/registry';
import { type DaemonProcess, call, snapshotsClient } from './daemon';
import { convertForTest } from './dedup';
import { buildImage, busyboxImageDef, chainIds, pseudoRandom, pushImage } from './images';
import type { RealRegistry, RegistryProxy } from './registry';

export interface LazyLayer {
  labels: Record<string, string>;
  content: Buffer;
}

export interface LazyImageContext {
  registry: RealRegistry;
  proxy: RegistryProxy;
  client: RegistryClient;
  dir: string;
}

/**
 * A converted one-layer image with `files` (default: `data.bin` of `size`
 * pseudo-random bytes; `prefetch` recorded at convert time); labels as
 * containerd's CRI passes them, through the proxy.
 */
export async function lazyImage(ctx: LazyImageContext, name: string, size: number, files?: { path: string; content: Buffer }[], prefetch?: string[]): Promise<LazyLayer> {
  const content = pseudoRandom(size, name);
  const entries = (files ?? [{ path: 'data.bin', content }]).map((f) => ({ type: 'file' as const, ...f }));
  const def = { ...busyboxImageDef(), name: `test/${name}`, layers: [entries] };
  const src = await pushImage(await buildImage(def), ctx.registry.host, ctx.dir);
  const converted = await convertForTest(ctx.client, src, `${ctx.registry.host}/dedup/${name}:v1`, ctx.dir, prefetch);
  const chain = chainIds(converted.layers.map((l) => l.digest));
  return {
    content,
    labels: {
      [LABEL_SNAPSHOT_REF]: chain[0],
      [LABEL_CRI_IMAGE_REF]: `${ctx.proxy.host}/dedup/${name}:v1`,
      [LABEL_CRI_LAYER_DIGEST]: converted.layers[0].digest,
      [LABEL_CRI_MANIFEST_DIGEST]: converted.manifestDigest,
    },
  };
}

/** Prepare as containerd's CRI unpacker does; checks the layer was made lazily with `backend`; returns its id. */
export async function lazyPrepare(d: DaemonProcess, l: LazyLayer, backend: string): Promise<string> {
  const c = snapshotsClient(d.address);
  const err = await call(c, 'Prepare', { key: `extract-${crypto.randomBytes(3).toString('hex')} ${l.labels[LABEL_SNAPSHOT_REF]}`, parent: '', labels: l.labels }).catch((e) => e);
  c.close();
  assert.equal(err?.code, 6, `AlreadyExists: ${err}`);
  const line = d.logs().find((x) => x.op === 'remote' && x.key === l.labels[LABEL_SNAPSHOT_REF]);
  assert.ok(line, 'the remote layer was logged');
  assert.equal(line.ondemand, backend);
  return String(line.layer);
}

/** A separate process reading `file` whole: resolves with its sha256, or "ERR:<code>". */
export function readInChild(file: string): { done: Promise<string>; exited: () => boolean } {
  const script = `const fs=require('fs'),c=require('crypto');const h=c.createHash('sha256');try{const fd=fs.openSync(process.argv[1],'r');const b=Buffer.alloc(1<<16);for(let p=0;;){const n=fs.readSync(fd,b,0,b.length,p);if(n===0)break;h.update(b.subarray(0,n));p+=n}process.stdout.write(h.digest('hex'))}catch(e){process.stdout.write('ERR:'+e.code)}`;
  const p = spawn(process.execPath, ['-e', script, file], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  let gone = false;
  p.stdout.on('data', (d) => (out += d));
  const done = new Promise<string>((r) => p.once('exit', () => ((gone = true), r(out))));
  return { done, exited: () => gone };
}

export const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');
