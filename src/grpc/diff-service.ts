import * as grpc from '@grpc/grpc-js';
import { invalidArgument, notImplemented } from '../errdefs/errors';
import type { LayerApplier, MountSpec } from '../layers/apply';
import type { Logger } from '../log/logger';
import { NAMESPACE_RE } from '../store/keys';
import { toGrpcError } from './status';

/**
 * Handlers of containerd.services.diff.v1.Diff, served on the daemon's
 * socket as the proxy differ "dedup-differ": Apply hands the layer to the
 * LayerApplier (one pass from the blob to an EROFS image); Diff is left to
 * containerd's walking differ, the diff service's default, which reads dedup
 * snapshots' mounts like any other (answered Unimplemented).
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
  return {
    Apply(call: grpc.ServerUnaryCall<{ diff?: WireDescriptor; mounts?: WireMount[] }, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const run = async () => {
        // containerd 2.x sends the namespace; 1.7 does not (the applier then takes the snapshot key's).
        const header = call.metadata.get('containerd-namespace')[0];
        if (header !== undefined && (typeof header !== 'string' || !NAMESPACE_RE.test(header))) throw invalidArgument(`Apply's containerd-namespace header ${JSON.stringify(String(header))} is not a namespace`);
        const ns = header as string | undefined;
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
    Diff(_call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      cb(toGrpcError(notImplemented("dedup-differ does not compute diffs: containerd's walking differ (the diff service's default) reads dedup snapshots")));
    },
  };
}
