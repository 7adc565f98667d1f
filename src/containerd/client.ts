import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { LOADER_OPTIONS, protoRoot } from './proto';

/**
 * A small client of containerd's own API (content, images, leases,
 * snapshots) on its socket, for `dedup-snapshotter pull` and `fsck`, and
 * for the daemon's POST /prefetch naming an image (containerd/image-layers.ts). Every
 * call carries the namespace, and the lease once one is set.
 */
type Unary = (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: any) => void) => void;
type Client = grpc.Client &
  Record<string, Unary> & {
    Write?: (md: grpc.Metadata, opts: grpc.CallOptions) => grpc.ClientDuplexStream<any, any>;
    Read?: (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions) => grpc.ClientReadableStream<any>;
  };

export interface Descriptor {
  media_type: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

export class ContainerdClient {
  private readonly content: Client;
  private readonly images: Client;
  private readonly leases: Client;
  private readonly namespaces: Client;
  private readonly snapshots: Client;
  private lease: string | null = null;

  constructor(
    address: string,
    private readonly namespace: string,
    private readonly timeoutMs = 120_000,
  ) {
    const def = protoLoader.loadSync(
      [
        'containerd/services/content/v1/content.proto',
        'containerd/services/images/v1/images.proto',
        'containerd/services/leases/v1/leases.proto',
        'containerd/services/namespaces/v1/namespace.proto',
        'containerd/services/snapshots/v1/snapshots.proto',
      ],
      { ...LOADER_OPTIONS, includeDirs: [protoRoot()] },
    );
    const pkg = grpc.loadPackageDefinition(def) as any;
    const target = `unix:${address}`;
    const creds = grpc.credentials.createInsecure();
    this.content = new pkg.containerd.services.content.v1.Content(target, creds);
    this.images = new pkg.containerd.services.images.v1.Images(target, creds, {}, {});
    this.leases = new pkg.containerd.services.leases.v1.Leases(target, creds);
    this.namespaces = new pkg.containerd.services.namespaces.v1.Namespaces(target, creds);
    this.snapshots = new pkg.containerd.services.snapshots.v1.Snapshots(target, creds);
  }

  private md(): grpc.Metadata {
    const md = new grpc.Metadata();
    md.set('containerd-namespace', this.namespace);
    if (this.lease) md.set('containerd-lease', this.lease);
    return md;
  }

  private call<T = any>(c: Client, method: string, req: unknown): Promise<T> {
    return new Promise((resolve, reject) => c[method](req, this.md(), { deadline: Date.now() + this.timeoutMs }, (err, res) => (err ? reject(err) : resolve(res))));
  }

  /** Creates a lease that expires on its own (a crash leaves nothing pinned for long) and uses it for every later call. */
  async useLease(id: string, expireMs: number): Promise<void> {
    await this.call(this.leases, 'Create', { id, labels: { 'containerd.io/gc.expire': new Date(Date.now() + expireMs).toISOString() } });
    this.lease = id;
  }

  /** Creates a lease that expires on its own after `expireMs` without using it for this client's calls; returns its id. */
  async createExpiringLease(id: string, expireMs: number): Promise<string> {
    const req = { id, labels: { 'containerd.io/gc.expire': new Date(Date.now() + expireMs).toISOString() } };
    // Its own deadline: a client made for streaming reads has none (timeoutMs 0).
    await new Promise((resolve, reject) => this.leases.Create(req, this.md(), { deadline: Date.now() + 30_000 }, (err, res) => (err ? reject(err) : resolve(res))));
    return id;
  }

  /**
   * Has containerd collect garbage now and waits for it: a lease created
   * and deleted with `sync` (what `ctr images rm --sync` does), so snapshots
   * removed from containerd's metadata are removed from their snapshotters
   * before this returns (otherwise its collector removes them a little
   * later, and a pull in between finds them still there).
   */
  async collectGarbage(): Promise<void> {
    const id = `dedup-gc-${process.pid}-${Date.now()}`;
    await this.call(this.leases, 'Create', { id, labels: { 'containerd.io/gc.expire': new Date(Date.now() + 60_000).toISOString() } });
    await this.call(this.leases, 'Delete', { id, sync: true });
  }

  async dropLease(): Promise<void> {
    if (!this.lease) return;
    const id = this.lease;
    this.lease = null;
    await this.call(this.leases, 'Delete', { id, sync: false });
  }

  /** Writes `data` as committed content `digest` (AlreadyExists: it is there), then sets `labels` on it. */
  async writeContent(digest: string, data: Buffer, labels: Record<string, string>): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const s = (this.content.Write as NonNullable<Client['Write']>)(this.md(), { deadline: Date.now() + this.timeoutMs });
      let done = false;
      s.on('data', (res: { action: number; digest: string }) => {
        if (res.action === 2) {
          done = true;
          s.end();
        }
      });
      s.on('error', (err: grpc.ServiceError) => (err.code === grpc.status.ALREADY_EXISTS ? resolve() : reject(err)));
      s.on('end', () => (done ? resolve() : reject(new Error(`content write of ${digest} ended without a commit`))));
      s.write({ action: 2, ref: `dedup-pull-${digest}`, total: data.length, expected: digest, offset: 0, data });
    });
    if (Object.keys(labels).length > 0) {
      await this.call(this.content, 'Update', {
        info: { digest, labels },
        update_mask: { paths: Object.keys(labels).map((k) => `labels.${k}`) },
      });
    }
  }

  /**
   * Streams `data` into the content store under a fresh ingest (`ref`) and
   * commits it as the digest `finish` names once the data has ended (it is
   * checked by containerd), with `labels`. `lease`: the caller's lease (the
   * content is protected from garbage collection under it until the
   * caller references it). AlreadyExists: the content is there already.
   */
  async writeContentStream(ref: string, data: AsyncIterable<Buffer>, finish: () => { digest: string; size: number; labels: Record<string, string> }, lease: string | null): Promise<void> {
    const md = new grpc.Metadata();
    md.set('containerd-namespace', this.namespace);
    if (lease) md.set('containerd-lease', lease);
    const s = (this.content.Write as NonNullable<Client['Write']>)(md, {});
    let failed: Error | null = null;
    let committed = false;
    let alreadyExists = false;
    const closed = new Promise<void>((resolve) => {
      s.on('data', (res: { action: number | string }) => {
        if (res.action === 2 || res.action === 'COMMIT') committed = true;
      });
      s.on('error', (err: grpc.ServiceError) => {
        if (err.code === grpc.status.ALREADY_EXISTS) alreadyExists = true;
        else failed = err;
        resolve();
      });
      s.on('end', () => resolve());
    });
    const send = async (msg: Record<string, unknown>) => {
      if (failed) throw failed;
      if (!s.write(msg)) await new Promise<void>((resolve) => s.once('drain', () => resolve()));
    };
    try {
      let offset = 0;
      for await (const piece of data) {
        await send({ action: 1, ref, offset, data: piece });
        offset += piece.length;
      }
      const { digest, size, labels } = finish();
      await send({ action: 2, ref, offset, total: size, expected: digest, labels });
      s.end();
    } catch (err) {
      s.cancel();
      throw err;
    }
    await closed;
    if (alreadyExists) return;
    if (failed) throw failed;
    if (!committed) throw new Error(`content write ${ref} ended without a commit`);
  }

  /** Prepare through containerd (its metadata layer, then the snapshotter); resolves with the gRPC status code. */
  async prepareSnapshot(snapshotter: string, key: string, parent: string, labels: Record<string, string>): Promise<number> {
    try {
      await this.call(this.snapshots, 'Prepare', { snapshotter, key, parent, labels });
      return grpc.status.OK;
    } catch (err) {
      const e = err as grpc.ServiceError;
      if (typeof e.code === 'number' && e.code !== grpc.status.UNAVAILABLE && e.code !== grpc.status.INTERNAL && e.code !== grpc.status.UNKNOWN) return e.code;
      throw err;
    }
  }

  async removeSnapshot(snapshotter: string, key: string): Promise<void> {
    await this.call(this.snapshots, 'Remove', { snapshotter, key });
  }

  /** Image `name`'s target (its index or manifest); NotFound (gRPC 5) when containerd has no such image. */
  async getImage(name: string): Promise<Descriptor> {
    const res = await this.call(this.images, 'Get', { name });
    return res.image.target as Descriptor;
  }

  /** The names of containerd's namespaces (namespaces are not namespaced: the client's own is not used). */
  async listNamespaces(): Promise<string[]> {
    const res = await this.call(this.namespaces, 'List', { filter: '' });
    return ((res.namespaces ?? []) as { name: string }[]).map((n) => n.name);
  }

  /** The names of every image in this namespace. */
  async listImages(): Promise<string[]> {
    return (await this.listImageTargets()).map((i) => i.name);
  }

  /** Every image in this namespace: its name and target (one call, not one per image). */
  async listImageTargets(): Promise<{ name: string; target: Descriptor }[]> {
    const res = await this.call(this.images, 'List', { filters: [] });
    return ((res.images ?? []) as { name: string; target: Descriptor }[]).map((i) => ({ name: i.name, target: i.target }));
  }

  /** Content `digest`, whole; refused when it is over `maxBytes` (manifests and configs are small). */
  async readContent(digest: string, maxBytes: number): Promise<Buffer> {
    const info = await this.call(this.content, 'Info', { digest });
    const size = Number(info.info.size);
    if (size > maxBytes) throw new Error(`content ${digest} is ${size} bytes, over the ${maxBytes} read here`);
    return new Promise<Buffer>((resolve, reject) => {
      const parts: Buffer[] = [];
      let got = 0;
      const s = (this.content.Read as NonNullable<Client['Read']>)({ digest, offset: 0, size: 0 }, this.md(), { deadline: Date.now() + this.timeoutMs });
      s.on('data', (res: { data: Buffer }) => {
        got += res.data.length;
        if (got > maxBytes) {
          s.cancel();
          reject(new Error(`content ${digest} is over the ${maxBytes} bytes read here`));
          return;
        }
        parts.push(res.data);
      });
      s.on('error', (err: grpc.ServiceError) => {
        if (err.code !== grpc.status.CANCELLED) reject(err);
      });
      s.on('end', () => resolve(Buffer.concat(parts)));
    });
  }

  /**
   * Content `digest` as a stream (a layer blob, read once front to back).
   * The stream ends early with an error if containerd's copy is shorter or
   * longer than `size` (when given).
   */
  async *streamContent(digest: string, size?: number): AsyncGenerator<Buffer> {
    const s = (this.content.Read as NonNullable<Client['Read']>)({ digest, offset: 0, size: 0 }, this.md(), {});
    let got = 0;
    try {
      for await (const res of s as AsyncIterable<{ data: Buffer }>) {
        got += res.data.length;
        if (size !== undefined && got > size) throw new Error(`content ${digest} is longer than its descriptor's ${size} bytes`);
        yield res.data;
      }
    } finally {
      s.cancel();
    }
    if (size !== undefined && got !== size) throw new Error(`content ${digest}: ${got} bytes read, its descriptor says ${size}`);
  }

  /** The labels containerd keeps on content `digest` (e.g. containerd.io/gc.ref.snapshot.<snapshotter> on an unpacked image's config). */
  async contentLabels(digest: string): Promise<Record<string, string>> {
    const info = await this.call(this.content, 'Info', { digest });
    return (info.info.labels ?? {}) as Record<string, string>;
  }

  /** Creates image `name` pointing at `target`, or points an existing one there. */
  async putImage(name: string, target: Descriptor, labels: Record<string, string> = {}): Promise<'created' | 'updated'> {
    try {
      await this.call(this.images, 'Create', { image: { name, target, labels } });
      return 'created';
    } catch (err) {
      if ((err as grpc.ServiceError).code !== grpc.status.ALREADY_EXISTS) throw err;
    }
    await this.call(this.images, 'Update', { image: { name, target, labels }, update_mask: { paths: ['target', 'labels'] } });
    return 'updated';
  }

  close(): void {
    for (const c of [this.content, this.images, this.leases, this.namespaces, this.snapshots]) c.close();
  }
}
