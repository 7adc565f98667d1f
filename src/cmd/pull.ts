import { ConfigError, loadConfig } from '../config/config';
import { ContainerdClient } from '../containerd/client';
import { defaultDockerConfigPath } from '../remote/auth';
import { parseReference } from '../remote/reference';
import { RegistryClient } from '../remote/registry';
import { pullDedupImage } from './pull-image';

const USAGE = `usage: dedup-snapshotter pull [--plain-http] [--address SOCK] [--namespace NS] [--snapshotter NAME] REF

Pulls the dedup image REF (see dedup-snapshotter convert) into containerd
the way its CRI plugin would, so \`ctr images ls\` shows it and
\`ctr run --snapshotter=dedup REF ...\` runs it: containerd downloads no layer;
the snapshotter makes each layer from its metadata and the chunks the node
lacks.

  --plain-http     reach REF's registry over plain HTTP (the daemon needs it in registry.plain_http_hosts too)
  --address        containerd's socket (default $CONTAINERD_ADDRESS or /run/containerd/containerd.sock)
  --namespace      containerd namespace (default $CONTAINERD_NAMESPACE or "default")
  --snapshotter    the proxy snapshotter's name in containerd's config (default "dedup")
`;

export async function runPull(argv: string[]): Promise<number> {
  const fail = (msg: string, code = 2) => {
    process.stderr.write(`dedup-snapshotter pull: ${msg}\n`);
    return code;
  };
  let plainHttp = false;
  let address = process.env.CONTAINERD_ADDRESS || '/run/containerd/containerd.sock';
  let namespace = process.env.CONTAINERD_NAMESPACE || 'default';
  let snapshotter = 'dedup';
  const refs: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = argv[++i];
      if (v === undefined || v === '') throw new Error(`${a} needs a value`);
      return v;
    };
    try {
      if (a === '--help' || a === '-h') {
        process.stdout.write(USAGE);
        return 0;
      } else if (a === '--plain-http') plainHttp = true;
      else if (a === '--address') address = value();
      else if (a === '--namespace' || a === '-n') namespace = value();
      else if (a === '--snapshotter') snapshotter = value();
      else if (a.startsWith('-')) return fail(`unknown option ${JSON.stringify(a)}\n${USAGE}`);
      else refs.push(a);
    } catch (err) {
      return fail(`${(err as Error).message}\n${USAGE}`);
    }
  }
  if (refs.length !== 1) return fail(`expected one REF\n${USAGE}`);
  let domain: string;
  try {
    domain = parseReference(refs[0]).domain;
  } catch (err) {
    return fail((err as Error).message);
  }
  let dockerConfig = defaultDockerConfigPath();
  try {
    dockerConfig = loadConfig().registry.docker_config ?? dockerConfig;
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    // The daemon's config is not needed to pull; docker's default is used.
  }
  const registry = new RegistryClient({ plainHttpHosts: plainHttp ? [domain] : [], dockerConfig });
  const containerd = new ContainerdClient(address, namespace);
  const started = Date.now();
  try {
    const r = await pullDedupImage({ registry, containerd, ref: refs[0], snapshotter, progress: (l) => process.stderr.write(`${l}\n`) });
    process.stdout.write(`${r.name}@${r.digest}: ${r.layers} layers ready in namespace ${namespace} (${((Date.now() - started) / 1000).toFixed(1)} s)\n`);
    return 0;
  } catch (err) {
    return fail((err as Error).message, 1);
  } finally {
    registry.close();
    containerd.close();
  }
}
