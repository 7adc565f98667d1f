import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { snapshotHomes, tempDir } from './daemon';

/**
 * Helpers for test/grpc-badinput.test.ts: a record of every status code the
 * daemon answered with, assertions on exact codes, and clients that speak
 * something other than the daemon's proto (a deliberately different .proto,
 * or raw bytes).
 */

export const SERVICE_PATH = '/containerd.services.snapshots.v1.Snapshots';

export const UNARY_METHODS = [
  'Prepare',
  'View',
  'Mounts',
  'Commit',
  'Remove',
  'Stat',
  'Update',
  'Usage',
  'Cleanup',
] as const;

export type GrpcErr = Error & { code: number; details: string };

/** Every (case, code) the daemon answered with; OK is recorded as 0. */
export class CodeRecorder {
  readonly seen: { what: string; code: number }[] = [];

  note(what: string, code: number): void {
    this.seen.push({ what, code });
  }

  /** Awaits p, expecting success; records OK. */
  async ok<T>(what: string, p: Promise<T>): Promise<T> {
    try {
      const res = await p;
      this.note(what, grpc.status.OK);
      return res;
    } catch (err) {
      const e = err as GrpcErr;
      this.note(what, e.code);
      assert.fail(`${what}: expected success, got code ${e.code} (${grpc.status[e.code]}): ${e.details ?? e.message}`);
    }
  }

  /**
   * Awaits p, expecting a gRPC error with exactly `code`; when `mentions` is
   * given, each string must appear in the error's message.
   */
  async fails(what: string, p: Promise<unknown>, code: grpc.status, mentions: string[] = []): Promise<GrpcErr> {
    let e: GrpcErr;
    try {
      await p;
      this.note(what, grpc.status.OK);
      assert.fail(`${what}: expected ${grpc.status[code]} (${code}), but the call succeeded`);
    } catch (err) {
      if (err instanceof assert.AssertionError) throw err;
      e = err as GrpcErr;
    }
    this.note(what, e.code);
    assert.notEqual(e.code, grpc.status.UNKNOWN, `${what}: answered UNKNOWN: ${e.details}`);
    assert.equal(
      e.code,
      code,
      `${what}: expected ${grpc.status[code]} (${code}), got ${grpc.status[e.code]} (${e.code}): ${e.details}`,
    );
    for (const m of mentions) {
      assert.ok(e.details.includes(m), `${what}: message ${JSON.stringify(e.details)} does not mention ${JSON.stringify(m)}`);
    }
    return e;
  }

  /** Awaits p; whatever the outcome, the code must not be UNKNOWN. Returns the code. */
  async anyButUnknown(what: string, p: Promise<unknown>, mustFail: boolean): Promise<number> {
    let code: number = grpc.status.OK;
    let details = '';
    try {
      await p;
    } catch (err) {
      code = (err as GrpcErr).code;
      details = (err as GrpcErr).details ?? (err as Error).message;
    }
    this.note(what, code);
    assert.equal(typeof code, 'number', `${what}: not a gRPC status: ${details}`);
    assert.notEqual(code, grpc.status.UNKNOWN, `${what}: answered UNKNOWN: ${details}`);
    if (mustFail) assert.notEqual(code, grpc.status.OK, `${what}: malformed request was accepted`);
    return code;
  }
}

/** A generic client that sends and receives raw bytes. */
export function rawClient(address: string): grpc.Client {
  return new grpc.Client(`unix:${address}`, grpc.credentials.createInsecure());
}

function nsMetadata(ns = 'default'): grpc.Metadata {
  const md = new grpc.Metadata();
  md.set('containerd-namespace', ns);
  return md;
}

const identity = (b: Buffer) => b;

/** Sends `bytes` as the request of unary `method`; resolves with the raw reply. */
export function rawUnary(client: grpc.Client, method: string, bytes: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      `${SERVICE_PATH}/${method}`,
      identity,
      identity,
      bytes,
      nsMetadata(),
      { deadline: Date.now() + 10_000 },
      (err, res) => (err ? reject(err) : resolve(res as Buffer)),
    );
  });
}

/** Sends `bytes` as the request of the List stream; resolves with the raw replies. */
export function rawList(client: grpc.Client, bytes: Buffer): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    const out: Buffer[] = [];
    const s = client.makeServerStreamRequest(`${SERVICE_PATH}/List`, identity, identity, bytes, nsMetadata(), {
      deadline: Date.now() + 10_000,
    });
    s.on('data', (d: Buffer) => out.push(d));
    s.on('error', reject);
    s.on('end', () => resolve(out));
  });
}

/**
 * The same service and message names as containerd's, but every field a
 * different type: keys are integers, labels are repeated integers, info is a
 * string, filters are packed integers. A client built from it sends
 * well-formed protobuf that does not match what the daemon expects.
 */
const ALIEN_PROTO = `
syntax = "proto3";
package containerd.services.snapshots.v1;

message AlienReq {
  int64 snapshotter = 1;
  int64 key = 2;
  int64 parent = 3;
  repeated int32 labels = 4;
}
message AlienCommit {
  int64 snapshotter = 1;
  int64 name = 2;
  double key = 3;
  repeated int32 labels = 4;
}
message AlienUpdate {
  int64 snapshotter = 1;
  string info = 2;
  int64 update_mask = 3;
}
message AlienList {
  int64 snapshotter = 1;
  repeated int32 filters = 2;
}
message AlienReply {
  bytes raw = 15;
}

service Snapshots {
  rpc Prepare(AlienReq) returns (AlienReply);
  rpc View(AlienReq) returns (AlienReply);
  rpc Mounts(AlienReq) returns (AlienReply);
  rpc Commit(AlienCommit) returns (AlienReply);
  rpc Remove(AlienReq) returns (AlienReply);
  rpc Stat(AlienReq) returns (AlienReply);
  rpc Update(AlienUpdate) returns (AlienReply);
  rpc List(AlienList) returns (stream AlienReply);
  rpc Usage(AlienReq) returns (AlienReply);
  rpc Cleanup(AlienReq) returns (AlienReply);
}
`;

export type AlienClient = grpc.Client & Record<string, any>;

export function alienClient(address: string): AlienClient {
  const dir = tempDir('badinput-proto');
  const file = path.join(dir, 'alien.proto');
  fs.writeFileSync(file, ALIEN_PROTO);
  let def: protoLoader.PackageDefinition;
  try {
    def = protoLoader.loadSync(file, { keepCase: true, longs: String, defaults: true });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const pkg = grpc.loadPackageDefinition(def) as any;
  const C = pkg.containerd.services.snapshots.v1.Snapshots as grpc.ServiceClientConstructor;
  return new C(`unix:${address}`, grpc.credentials.createInsecure()) as AlienClient;
}

export function alienCall(client: AlienClient, method: string, req: unknown): Promise<unknown> {
  return new Promise((resolve, reject) => {
    client[method](req, nsMetadata(), { deadline: Date.now() + 10_000 }, (err: grpc.ServiceError | null, res: unknown) =>
      err ? reject(err) : resolve(res),
    );
  });
}

export function alienList(client: AlienClient, req: unknown): Promise<unknown[]> {
  return new Promise((resolve, reject) => {
    const out: unknown[] = [];
    const s = client.List(req, nsMetadata(), { deadline: Date.now() + 10_000 });
    s.on('data', (d: unknown) => out.push(d));
    s.on('error', reject);
    s.on('end', () => resolve(out));
  });
}

/** Names under ROOT/snapshots. */
export const snapshotDirs = snapshotHomes;

/** Every snapshot lives in snapshots/<id> (a directory) or images/<id>.erofs, named by numeric id. */
export function assertOnlyNumericDirs(root: string, context: string): void {
  for (const home of snapshotHomes(root)) {
    assert.match(home, /^(snapshots\/[0-9]+|images\/[0-9]+\.erofs)$/, `${context}: ROOT holds ${JSON.stringify(home)}, not named by a numeric id`);
    const st = fs.lstatSync(path.join(root, home));
    assert.ok(home.startsWith('images/') ? st.isFile() : st.isDirectory(), `${context}: ${home} has the wrong type`);
  }
}

/** The numeric id a bind or overlay mount's upper dir names. */
export function upperDirOf(mounts: { type: string; source: string; options: string[] }[]): string {
  assert.equal(mounts.length, 1, `expected one mount, got ${JSON.stringify(mounts)}`);
  const m = mounts[0];
  if (m.type === 'bind') return m.source;
  const upper = m.options.find((o) => o.startsWith('upperdir='));
  assert.ok(upper, `overlay mount without upperdir: ${JSON.stringify(m)}`);
  return upper.slice('upperdir='.length);
}

/**
 * Like helpers/daemon's list(), with a deadline: a server that never ends
 * the stream (or never sends its status) fails the call instead of hanging
 * the test.
 */
export function listWithin(client: grpc.Client & Record<string, any>, filters: string[] = [], ms = 10_000): Promise<any[]> {
  const md = new grpc.Metadata();
  md.set('containerd-namespace', (client as any).__ns ?? 'default');
  return new Promise((resolve, reject) => {
    const infos: any[] = [];
    const s = client.List({ filters }, md, { deadline: Date.now() + ms });
    s.on('data', (d: { info: any[] }) => infos.push(...d.info));
    s.on('error', reject);
    s.on('end', () => resolve(infos));
  });
}
