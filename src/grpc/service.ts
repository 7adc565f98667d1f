import * as grpc from '@grpc/grpc-js';
import { invalidArgument } from '../errdefs/errors';
import type { Logger } from '../log/logger';
import type { Snapshotter } from '../snapshot/snapshotter';
import { type Info, Kind, type Labels, type Mount } from '../store/types';
import { NAMESPACE_RE, splitKey } from '../store/keys';
import { classify, toGrpcError } from './status';

/**
 * Handlers of containerd.services.snapshots.v1.Snapshots: decode, call the
 * snapshotter, map errors. Nothing else lives here.
 */

interface WireTimestamp {
  seconds: string | number;
  nanos: number;
}

interface WireInfo {
  name: string;
  parent: string;
  kind: number;
  created_at: WireTimestamp | null;
  updated_at: WireTimestamp | null;
  labels: Record<string, string>;
}

const LIST_BATCH = 100;

function toTimestamp(ms: number): WireTimestamp {
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 };
}

function toWireInfo(info: Info): WireInfo {
  return {
    name: info.name,
    parent: info.parent,
    kind: info.kind,
    created_at: toTimestamp(info.created),
    updated_at: toTimestamp(info.updated),
    labels: info.labels,
  };
}

function toWireMounts(mounts: Mount[]) {
  return mounts.map((m) => ({ type: m.type, source: m.source, target: m.target ?? '', options: m.options }));
}

function str(v: unknown, field: string): string {
  if (v === undefined || v === null) return '';
  if (typeof v !== 'string') throw invalidArgument(`${field} must be a string`);
  return v;
}

function labelsOf(v: unknown): Labels {
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object') throw invalidArgument('labels must be a map of strings');
  return v as Labels;
}

/**
 * The containerd namespace of a call: the `containerd-namespace` header
 * when the caller sends one, else the first part of the key, which
 * containerd's metadata layer writes as `<namespace>/<txid>/<name>` for
 * a proxy snapshotter (it sends no header).
 */
export function namespaceOf(call: { metadata: grpc.Metadata }, key?: unknown): string | undefined {
  const v = call.metadata.get('containerd-namespace')[0];
  if (typeof v === 'string' && v !== '') return v;
  const ns = typeof key === 'string' ? splitKey(key)?.ns : undefined;
  return ns !== undefined && NAMESPACE_RE.test(ns) ? ns : undefined;
}

export interface ServiceOptions {
  snapshotter: Snapshotter;
  logger: Logger;
  /** Tracks in-flight calls so shutdown can drain them. */
  track?: <T>(p: Promise<T>) => Promise<T>;
  /** Told of every mutating call (prepare, view, commit, remove, update, cleanup), ok or failed. */
  onMutation?: (e: MutationEvent) => void;
}

export interface MutationEvent {
  op: string;
  key: string | null;
  snapshotId: string | null;
  /** Set when the call concerns a committed layer (commit, remove of a layer). */
  layerId: string | null;
  ok: boolean;
  error: string | null;
  code: string | null;
  durationMs: number;
  details: Record<string, unknown>;
}

/** For the audit log: how a mutating call names its snapshot, and what else to note. */
interface Audited<Req> {
  key: (req: Req) => unknown;
  /** Looked up before the call (remove: the row is gone after). */
  before?: boolean;
  layer?: boolean;
  details?: (req: Req) => Record<string, unknown>;
}

export function createSnapshotsHandlers(opts: ServiceOptions): grpc.UntypedServiceImplementation {
  const { snapshotter: sn, logger } = opts;
  const track = opts.track ?? (<T>(p: Promise<T>) => p);

  const textOf = (v: unknown): string | null => (typeof v === 'string' && v !== '' ? v.slice(0, 4096) : null);
  /** The names of the labels a call carried (debug lines: which labels each containerd version passes). */
  const labelKeysOf = (req: unknown): { label_keys?: string[] } => {
    const l = (req as { labels?: unknown } | undefined)?.labels;
    if (!l || typeof l !== 'object') return {};
    const keys = Object.keys(l).slice(0, 64);
    return keys.length > 0 ? { label_keys: keys.map((k) => k.slice(0, 256)) } : {};
  };

  function unary<Req, Res>(
    op: string,
    fn: (req: Req) => Promise<Res>,
    audited?: Audited<Req>,
  ): grpc.handleUnaryCall<Req, Res> {
    return (call, callback) => {
      const started = Date.now();
      const req = call.request as Req & { key?: string };
      let idBefore: string | undefined;
      let layerBefore = false;
      const key = audited ? textOf(audited.key(req)) : null;
      if (audited?.before && key !== null && opts.onMutation) {
        try {
          idBefore = sn.idOf(key);
          layerBefore = idBefore !== undefined && sn.ms.getInfo(key).info.kind === Kind.Committed;
        } catch {
          // the call itself reports what is wrong
        }
      }
      const report = (ok: boolean, err: { kind: string; message: string } | null) => {
        if (!audited || !opts.onMutation) return;
        const id = idBefore ?? (ok && key !== null ? sn.idOf(key) : undefined) ?? null;
        const details: Record<string, unknown> = { ns: namespaceOf(call, key) ?? null, ...(audited.details ? audited.details(req) : {}) };
        // An expected answer (a remote layer made: AlreadyExists) is a success that says what containerd was told.
        if (ok && err) details.answer = err.kind;
        try {
          opts.onMutation({
            op,
            key,
            snapshotId: id,
            layerId: audited.layer || layerBefore ? id : null,
            ok,
            error: ok ? null : (err?.message ?? null),
            code: err?.kind ?? null,
            durationMs: Date.now() - started,
            details,
          });
        } catch {
          // the audit's trouble is not the caller's
        }
      };
      track(
        (async () => fn(req))().then(
          (res) => {
            logger.debug({ op, key: req?.key, ns: namespaceOf(call, req?.key), ...labelKeysOf(req), duration_ms: Date.now() - started }, 'rpc done');
            report(true, null);
            callback(null, res);
          },
          (err) => {
            const e = classify(err);
            if (e.expected) {
              // containerd's contract (a remote layer made): the layer's own line says so.
              logger.debug({ op, key: req?.key, ns: namespaceOf(call, req?.key), code: e.kind, ...labelKeysOf(req), duration_ms: Date.now() - started }, `${op} answered ${e.kind}: ${e.message}`);
              report(true, e);
              callback(toGrpcError(e), null);
              return;
            }
            report(false, e);
            const level = e.kind === 'Internal' || e.kind === 'Unavailable' ? 'error' : 'info';
            logger[level](
              { op, key: req?.key, ns: namespaceOf(call, req?.key), code: e.kind, err: e.message, duration_ms: Date.now() - started },
              `${op} failed`,
            );
            callback(toGrpcError(e), null);
          },
        ),
      ).catch(() => undefined);
    };
  }

  return {
    Prepare: unary(
      'prepare',
      async (req: any) => ({
        mounts: toWireMounts(await sn.prepare(str(req.key, 'key'), str(req.parent, 'parent'), labelsOf(req.labels))),
      }),
      { key: (req: any) => req?.key, details: (req: any) => ({ parent: textOf(req?.parent) }) },
    ),
    View: unary(
      'view',
      async (req: any) => ({
        mounts: toWireMounts(await sn.view(str(req.key, 'key'), str(req.parent, 'parent'), labelsOf(req.labels))),
      }),
      { key: (req: any) => req?.key, details: (req: any) => ({ parent: textOf(req?.parent) }) },
    ),
    Mounts: unary('mounts', async (req: any) => ({ mounts: toWireMounts(await sn.mounts(str(req.key, 'key'))) })),
    Commit: unary(
      'commit',
      async (req: any) => {
        await sn.commit(str(req.name, 'name'), str(req.key, 'key'), labelsOf(req.labels));
        return {};
      },
      { key: (req: any) => req?.name, layer: true, details: (req: any) => ({ active_key: textOf(req?.key) }) },
    ),
    Remove: unary(
      'remove',
      async (req: any) => {
        await sn.remove(str(req.key, 'key'));
        return {};
      },
      { key: (req: any) => req?.key, before: true },
    ),
    Stat: unary('stat', async (req: any) => ({ info: toWireInfo(await sn.stat(str(req.key, 'key'))) })),
    Update: unary('update', async (req: any) => {
      const info = req.info;
      if (!info || typeof info !== 'object') throw invalidArgument('update: info is required');
      const paths: string[] = req.update_mask?.paths ?? [];
      const updated = await sn.update({ name: str(info.name, 'info.name'), labels: labelsOf(info.labels) }, paths);
      return { info: toWireInfo(updated) };
    }, { key: (req: any) => req?.info?.name, details: (req: any) => ({ fields: Array.isArray(req?.update_mask?.paths) ? req.update_mask.paths.slice(0, 100) : [] }) }),
    Usage: unary('usage', async (req: any) => {
      const u = await sn.usage(str(req.key, 'key'));
      return { size: String(u.size), inodes: String(u.inodes) };
    }),
    Cleanup: unary(
      'cleanup',
      async () => {
        await sn.cleanup();
        return {};
      },
      { key: () => null },
    ),
    List: (call: grpc.ServerWritableStream<any, any>) => {
      const started = Date.now();
      track(
        (async () => {
          const filters: string[] = Array.isArray(call.request?.filters) ? call.request.filters : [];
          let batch: WireInfo[] = [];
          await sn.walk((info) => {
            batch.push(toWireInfo(info));
            if (batch.length >= LIST_BATCH) {
              call.write({ info: batch });
              batch = [];
            }
          }, filters);
          if (batch.length > 0) call.write({ info: batch });
        })().then(
          () => {
            logger.debug({ op: 'list', duration_ms: Date.now() - started }, 'rpc done');
            call.end();
          },
          (err) => {
            const e = classify(err);
            logger.info({ op: 'list', code: e.kind, err: e.message }, 'list failed');
            call.emit('error', toGrpcError(e));
          },
        ),
      ).catch(() => undefined);
    },
  };
}

