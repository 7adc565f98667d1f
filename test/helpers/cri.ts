/** A client of containerd's CRI ImageService (runtime.v1) on containerd's own socket. */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { LOADER_OPTIONS, protoRoot } from '../../src/containerd/proto';

type Unary = (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: any) => void) => void;

export class CriImages {
  private readonly client: grpc.Client & Record<string, Unary>;

  constructor(containerdAddress: string) {
    const def = protoLoader.loadSync('k8s/cri/runtime/v1/image.proto', { ...LOADER_OPTIONS, includeDirs: [protoRoot()] });
    const pkg = grpc.loadPackageDefinition(def) as any;
    this.client = new pkg.runtime.v1.ImageService(`unix:${containerdAddress}`, grpc.credentials.createInsecure());
  }

  private call(method: string, req: unknown, timeoutMs: number): Promise<any> {
    return new Promise((resolve, reject) =>
      this.client[method](req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res))),
    );
  }

  /** Pulls `image` as the kubelet does; resolves with containerd's image ref (the config digest). */
  async pull(image: string, timeoutMs = 120_000): Promise<string> {
    return (await this.call('PullImage', { image: { image } }, timeoutMs)).image_ref;
  }

  async remove(image: string, timeoutMs = 60_000): Promise<void> {
    await this.call('RemoveImage', { image: { image } }, timeoutMs);
  }

  close(): void {
    this.client.close();
  }
}
