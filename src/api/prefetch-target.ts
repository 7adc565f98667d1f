import * as grpc from '@grpc/grpc-js';
import { ContainerdClient } from '../containerd/client';
import { imageChainIds } from '../containerd/image-layers';
import { isNotFound, notFound } from '../errdefs/errors';
import type { LayerRoot } from '../ondemand/prefetch';
import { formatReference, parseReference } from '../remote/reference';

export interface PrefetchTargetOptions {
  /** Layer roots of a layer id, a chain id (in a namespace first) or containerd's snapshot key (Snapshotter.layerRoots). */
  layerRoots: (ref: string, namespace: string) => LayerRoot[];
  /** containerd's socket, asked for an image reference's layers. */
  containerdAddress: string;
}

/**
 * What POST /prefetch's `image_id` names, as layer roots: what the
 * snapshotter knows itself (a layer id, a chain id, a snapshot key), else
 * an image reference (`127.0.0.1:5000/app:1`, `alpine`) that containerd
 * knows in `namespace`: its top layer's chain id, from the image's
 * manifest and config in containerd's content store.
 */
export function prefetchTargets(o: PrefetchTargetOptions): (ref: string, namespace: string) => Promise<LayerRoot[]> {
  return async (ref, namespace) => {
    try {
      return o.layerRoots(ref, namespace);
    } catch (err) {
      if (!isNotFound(err) || /^sha256:[0-9a-f]{64}$/.test(ref) || /^[0-9]+$/.test(ref)) throw err;
    }
    let names: string[];
    try {
      // As given (ctr keeps names as typed at pull), then in full form (CRI's docker.io/library/…).
      names = [...new Set([ref, formatReference(parseReference(ref))])];
    } catch {
      throw notFound(`no layer ${JSON.stringify(ref)} (expected an image reference as in ctr images ls, a chain id as in ctr snapshots --snapshotter dedup ls, or a layer id as in images/<id>.erofs)`);
    }
    const client = new ContainerdClient(o.containerdAddress, namespace, 10_000);
    try {
      for (const name of names) {
        let chains: string[];
        try {
          chains = await imageChainIds(client, name);
        } catch (err) {
          if ((err as grpc.ServiceError).code === grpc.status.NOT_FOUND) continue;
          if ((err as grpc.ServiceError).code === grpc.status.UNAVAILABLE) {
            throw notFound(`no layer ${JSON.stringify(ref)} here, and containerd, to look it up as an image, does not answer on ${o.containerdAddress} (the daemon asks the socket in CONTAINERD_ADDRESS): give a chain id or a layer id`);
          }
          throw notFound(`image ${JSON.stringify(name)} in namespace ${namespace}: ${(err as Error).message}`);
        }
        const top = chains.at(-1);
        if (top === undefined) throw notFound(`image ${JSON.stringify(name)} has no layers`);
        try {
          return o.layerRoots(top, namespace);
        } catch (err) {
          if (!isNotFound(err)) throw err;
          throw notFound(`image ${JSON.stringify(name)} (namespace ${namespace}) is not unpacked with this snapshotter (its top layer ${top} is not here): pull it with --snapshotter=dedup`);
        }
      }
      throw notFound(`no layer ${JSON.stringify(ref)} here, and no image ${JSON.stringify(ref)} in containerd's namespace ${JSON.stringify(namespace)}${names.length > 1 ? ` (also tried ${names[1]})` : ''}; give "namespace" for another one`);
    } finally {
      client.close();
    }
  };
}
