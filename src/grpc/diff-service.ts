import * as grpc from '@grpc/grpc-js';
import { invalidArgument, isKind } from '../errdefs/errors';
import type { LayerApplier, MountSpec } from '../layers/apply';
import { LayerDiffer } from '../layers/diff';
import type { Logger } from '../log/logger';
import { NAMESPACE_RE } from '../store/keys';
import { toGrpcError } from './status';

/**
 * Handlers of containerd.services.diff.v1.Diff, served on the daemon's
 * socket as the proxy differ "dedup-differ": Apply hands the layer to the
 * LayerApplier (one pass from the blob to an EROFS image); Diff writes a
 * dedup active snapshot's changes (its upper directory) as a layer in
 * containerd's content store (LayerDiffer), and answers Unimplemented for
 * anything else, so that the diff service asks its next differ.
 */
interface WireDescriptor {
  media_type?: string;
  digest?: string;
  size?: string | number;
  annotations?: Record<string, string>;
}

interface WireMount {
  type?: string;
  source?: string;
  target?: string;
  options?: string[];
}

function mountsOf(v: unknown): MountSpec[] {
  if (!Array.isArray(v)) throw invalidArgument('mounts must be a list');
  return (v as WireMount[]).map((m, i) => {
    if (typeof m?.type !== 'string' || typeof m?.source !== 'string') throw invalidArgument(`mount ${i} has no type or source`);
    const options = m.options ?? [];
    if (!Array.isArray(options) || options.some((o) => typeof o !== 'string')) throw invalidArgument(`mount ${i}: options must be strings`);
    return { type: m.type, source: m.source, target: m.target, options };
  });
}

export function createDiffHandlers(o: { applier: LayerApplier; logger: Logger; track?: <T>(p: Promise<T>) => Promise<T> }): grpc.UntypedServiceImplementation {
  const track = o.track ?? (<T>(p: Promise<T>) => p);
  const differ = new LayerDiffer({ layout: o.applier.layout, snapshotOf: (m) => o.applier.snapshotOf(m), client: (ns) => o.applier.clientFor(ns), namespaceOf: (id) => o.applier.namespaceOf(id), logger: o.logger });
  /** The request's containerd-namespace header, checked (containerd 1.7 sends none to proxy differs: the snapshot key's is used). */
  const namespaceOf = (md: grpc.Metadata, rpc: string): string | undefined => {
    const header = md.get('containerd-namespace')[0];
    if (header !== undefined && (typeof header !== 'string' || !NAMESPACE_RE.test(header))) throw invalidArgument(`${rpc}'s containerd-namespace header ${JSON.stringify(String(header))} is not a namespace`);
    return header as string | undefined;
  };
  return {
    Apply(call: grpc.ServerUnaryCall<{ diff?: WireDescriptor; mounts?: WireMount[] }, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const run = async () => {
        // containerd 2.x sends the namespace; 1.7 does not (the applier then takes the snapshot key's).
        const ns = namespaceOf(call.metadata, 'Apply');
        const d = call.request.diff;
        if (!d || typeof d.digest !== 'string' || typeof d.media_type !== 'string') throw invalidArgument('Apply needs the layer descriptor (diff: media type and digest)');
        const size = Number(d.size ?? 0);
        if (!Number.isSafeInteger(size) || size < 0) throw invalidArgument(`layer size ${JSON.stringify(d.size)} is not a byte count`);
        const applied = await o.applier.apply({ mediaType: d.media_type, digest: d.digest, size, mounts: mountsOf(call.request.mounts ?? []), namespace: ns });
        return { applied: { media_type: applied.mediaType, digest: applied.digest, size: String(applied.size), annotations: {} } };
      };
      track(run()).then(
        (res) => cb(null, res),
        (err) => cb(toGrpcError(err)),
      );
    },
    Diff(call: grpc.ServerUnaryCall<{ left?: WireMount[]; right?: WireMount[]; media_type?: string; ref?: string; labels?: Record<string, string> }, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const run = async () => {
        const namespace = namespaceOf(call.metadata, 'Diff');
        const lease = call.metadata.get('containerd-lease')[0];
        const r = call.request;
        const result = await differ.diff({
          left: mountsOf(r.left ?? []),
          right: mountsOf(r.right ?? []),
          mediaType: typeof r.media_type === 'string' ? r.media_type : '',
          ref: typeof r.ref === 'string' ? r.ref.slice(0, 200) : '',
          labels: r.labels ?? {},
          namespace,
          lease: typeof lease === 'string' && lease !== '' ? lease : null,
        });
        return { diff: { media_type: result.mediaType, digest: result.digest, size: String(result.size), annotations: {} } };
      };
      track(run()).then(
        (res) => cb(null, res),
        (err) => {
          // NotImplemented hands the diff to the diff service's next differ: worth one line, not an error.
          if (isKind(err, 'NotImplemented')) o.logger.info({ op: 'diff', err: (err as Error).message }, `Diff left to the next differ: ${(err as Error).message}`);
          else o.logger.error({ op: 'diff', err: (err as Error).message }, `Diff failed: ${(err as Error).message}`);
          cb(toGrpcError(err));
        },
      );
    },
  };
}
