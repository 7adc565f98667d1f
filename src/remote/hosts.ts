import fs from 'node:fs';
import path from 'node:path';
import { type TomlValue, scanToml } from '../containerd/toml-reader';
import { registryHost as apiHost } from './reference';

/*
 * containerd's registry host directories (`hosts.toml`, what CRI's
 * `registry.config_path` and ctr's `--hosts-dir` name): for a registry
 * host, the mirrors to try first and the registry itself, each with its
 * scheme, path prefix, capabilities, CAs, client certificate, skip_verify
 * and extra headers. Read the way containerd reads them
 * (core/remotes/docker/config/hosts.go): the directory `<root>/<host>`
 * (`host:port` as written in image references; for a host with a port,
 * `host_port_` first), else `<root>/_default`;
 * `[host."…"]` tables in file order, then `server` (default: the registry
 * itself over https); a URL path gets `/v2` appended unless it ends in
 * `/v2` or `override_path` is set; `capabilities` default to pull,
 * resolve and push; relative certificate paths are relative to the
 * directory. A directory without hosts.toml contributes its docker-style
 * `*.crt` CAs and `*.cert`/`*.key` client pairs to the registry itself.
 */

export type HostCapability = 'pull' | 'resolve' | 'push';

export interface RegistryEndpoint {
  /** "https" or "http". */
  scheme: 'https' | 'http';
  /** host[:port] requests go to (and credentials are looked up for). */
  host: string;
  /** Path prefix the API lives under ("/v2", or the mirror's own). */
  path: string;
  capabilities: ReadonlySet<HostCapability>;
  /** PEM CA certificates (contents), added to the system's. */
  ca: Buffer[];
  /** PEM client certificate and key (contents). */
  client: { cert: Buffer; key: Buffer } | null;
  skipVerify: boolean;
  headers: Record<string, string>;
  /** Not the registry itself: requests carry `ns=<registry>` as containerd's do. */
  mirror: boolean;
  /** No file chose its scheme (the registry itself, without hosts.toml or `server`): the client's plain_http_hosts decide. */
  implicit: boolean;
  /** Set by the client for one request: retries on this host (only the last host tried retries, as containerd does). */
  retries?: number;
}

const ALL: ReadonlySet<HostCapability> = new Set(['pull', 'resolve', 'push']);

export class HostsConfigError extends Error {}

/** The endpoint of registry `domain` itself, as without any host directory (Docker Hub's API host for docker.io). */
export function defaultEndpoint(domain: string): RegistryEndpoint {
  return { scheme: 'https', host: apiHost(domain), path: '/v2', capabilities: ALL, ca: [], client: null, skipVerify: false, headers: {}, mirror: false, implicit: true };
}

interface RawHost {
  url: string;
  line: number;
  capabilities?: HostCapability[];
  ca?: string[];
  client?: [string, string | null][];
  skipVerify?: boolean;
  overridePath?: boolean;
  headers: Record<string, string>;
}

/**
 * Host directories under `roots` (tried in order; missing roots are
 * skipped). `endpoints(host)` reads the directory again whenever hosts.toml
 * or a certificate file it names changes (mtime, size), so an edit applies
 * to the requests made from `recheckMs` (default 1 s) after it: within that
 * time the last answer is used without a stat (a lazy layer reads a chunk
 * range per request).
 */
export class RegistryHosts {
  /** Per registry: what the endpoints were read from (hosts.toml and each certificate file, by mtime and size), and them. */
  private readonly cache = new Map<string, { stamp: string; deps: string[]; endpoints: RegistryEndpoint[] }>();
  /** Per registry: the last answer and when the files were last looked at. */
  private readonly recent = new Map<string, { at: number; endpoints: RegistryEndpoint[] }>();
  /** Certificate files read while endpoints() reads a directory. */
  private deps: string[] = [];
  private readonly recheckMs: number;
  private readonly now: () => number;

  constructor(
    private readonly roots: readonly string[],
    opts: { recheckMs?: number; now?: () => number } = {},
  ) {
    this.recheckMs = opts.recheckMs ?? 1000;
    this.now = opts.now ?? Date.now;
  }

  /** The directory containerd would read for `registryHost`, or null (no root has one). */
  dirFor(registryHost: string): string | null {
    for (const root of this.roots) {
      // containerd's names: `host_port_` (a host with a port), `host:port`, then `_default`.
      const port = /^(.*):(\d+)$/.exec(registryHost);
      for (const name of [...(port ? [`${port[1]}_${port[2]}_`] : []), registryHost, '_default']) {
        // A reference's host never holds a path separator; a name that would leave the root is not looked up.
        if (name.includes('/') || name === '.' || name === '..') continue;
        const dir = path.join(root, name);
        try {
          if (fs.statSync(dir).isDirectory()) return dir;
        } catch {
          // not there: next
        }
      }
    }
    return null;
  }

  /** Where to send requests for `registryHost`, in the order to try them. Throws HostsConfigError for a file that cannot be used. */
  endpoints(registryHost: string): RegistryEndpoint[] {
    const at = this.now();
    const recent = this.recent.get(registryHost);
    if (recent && at - recent.at < this.recheckMs) return recent.endpoints;
    const endpoints = this.readEndpoints(registryHost);
    this.recent.set(registryHost, { at, endpoints });
    return endpoints;
  }

  private readEndpoints(registryHost: string): RegistryEndpoint[] {
    const dir = this.dirFor(registryHost);
    if (!dir) return [defaultEndpoint(registryHost)];
    const file = path.join(dir, 'hosts.toml');
    let stamp: string;
    try {
      const st = fs.statSync(file);
      stamp = `${dir}\0${st.mtimeMs}\0${st.size}`;
    } catch {
      stamp = `${dir}\0none\0${fs.readdirSync(dir).join('\0')}`;
    }
    const key = `${registryHost}\0${dir}`;
    const cached = this.cache.get(key);
    if (cached && cached.stamp === stamp + filesStamp(cached.deps)) return cached.endpoints;
    this.deps = [];
    const endpoints = fs.existsSync(file) ? this.readHostsToml(registryHost, dir, file) : [this.withCertsDir(defaultEndpoint(registryHost), dir)];
    const deps = this.deps;
    this.cache.set(key, { stamp: stamp + filesStamp(deps), deps, endpoints });
    return endpoints;
  }

  private readHostsToml(registryHost: string, dir: string, file: string): RegistryEndpoint[] {
    const text = fs.readFileSync(file, 'utf8');
    const top: RawHost = { url: '', line: 0, headers: {} };
    const hosts = new Map<string, RawHost>();
    const fail = (line: number, msg: string): never => {
      throw new HostsConfigError(`${file}:${line}: ${msg}`);
    };
    const hostOf = (url: string, line: number): RawHost => {
      let h = hosts.get(url);
      if (!h) {
        h = { url, line, headers: {} };
        hosts.set(url, h);
      }
      return h;
    };
    const set = (h: RawHost, key: string[], v: TomlValue, line: number, where: string): void => {
      const name = key.join('.');
      if (key.length === 2 && key[0] === 'header') {
        const values = strings(v);
        if (!values) fail(line, `${where}header.${key[1]}: expected a string or a list of strings`);
        if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(key[1])) fail(line, `${where}header.${JSON.stringify(key[1])}: not an HTTP header name`);
        const value = (values as string[]).join(', ');
        if (/[\r\n\0]/.test(value)) fail(line, `${where}header.${key[1]}: a header value cannot hold line breaks or NUL`);
        h.headers[key[1].toLowerCase()] = value;
        return;
      }
      if (key[0] === 'header' && key.length === 1 && v.kind === 'table') {
        for (const [k, x] of v.entries) set(h, ['header', ...k], x, line, where);
        return;
      }
      switch (name) {
        case 'capabilities': {
          const caps = strings(v);
          if (!caps || caps.some((c) => c !== 'pull' && c !== 'resolve' && c !== 'push')) fail(line, `${where}capabilities: expected a list of "pull", "resolve", "push"`);
          h.capabilities = caps as HostCapability[];
          return;
        }
        case 'ca': {
          const cas = strings(v);
          if (!cas) fail(line, `${where}ca: expected a path or a list of paths`);
          h.ca = cas as string[];
          return;
        }
        case 'client': {
          // "cert", ["cert", "key"] or [["cert", "key"], …].
          const pairs: [string, string | null][] = [];
          if (v.kind === 'string') pairs.push([v.value, null]);
          else if (v.kind === 'array' && v.items.every((i) => i.kind === 'string')) pairs.push([(v.items[0] as { value: string }).value, (v.items[1] as { value: string } | undefined)?.value ?? null]);
          else if (v.kind === 'array' && v.items.every((i) => i.kind === 'array')) {
            for (const i of v.items) {
              const p = strings(i);
              if (!p || p.length < 1 || p.length > 2) fail(line, `${where}client: expected ["cert", "key"] pairs`);
              pairs.push([(p as string[])[0], (p as string[])[1] ?? null]);
            }
          } else fail(line, `${where}client: expected a path, ["cert", "key"] or a list of them`);
          h.client = pairs;
          return;
        }
        case 'skip_verify':
          if (v.kind !== 'bool') fail(line, `${where}skip_verify: expected true or false`);
          h.skipVerify = (v as { value: boolean }).value;
          return;
        case 'override_path':
          if (v.kind !== 'bool') fail(line, `${where}override_path: expected true or false`);
          h.overridePath = (v as { value: boolean }).value;
          return;
        default:
        // containerd ignores keys it does not know; so do we.
      }
    };
    scanToml(text, {
      error: (line, msg) => fail(line, msg),
      header: (table, _isArray, line) => {
        if (table[0] === 'host' && table.length >= 2) hostOf(table[1], line);
      },
      assign: (full, value, line) => {
        if (full[0] === 'host' && full.length >= 2) {
          const h = hostOf(full[1], line);
          if (full.length === 2) {
            if (value.kind !== 'table') fail(line, `host.${JSON.stringify(full[1])}: expected a table`);
            for (const [k, x] of (value as { entries: [string[], TomlValue][] }).entries) set(h, k, x, line, `host.${JSON.stringify(full[1])}.`);
          } else set(h, full.slice(2), value, line, `host.${JSON.stringify(full[1])}.`);
          return;
        }
        if (full.length === 1 && full[0] === 'server') {
          if (value.kind !== 'string') fail(line, 'server: expected a URL');
          top.url = (value as { value: string }).value;
          top.line = line;
          return;
        }
        set(top, full, value, line, '');
      },
    });
    const out: RegistryEndpoint[] = [];
    for (const h of [...hosts.values()].sort((a, b) => a.line - b.line)) out.push(this.endpointOf(registryHost, dir, h, file));
    // Without `server` the registry itself comes last with every capability (containerd ignores a top-level `capabilities` then).
    out.push(top.url ? this.endpointOf(registryHost, dir, top, file) : { ...defaultEndpoint(registryHost), ...this.tlsOf(dir, top, file) });
    return out;
  }

  private endpointOf(registryHost: string, dir: string, h: RawHost, file: string): RegistryEndpoint {
    const raw = /^[a-z][a-z0-9+.-]*:\/\//i.test(h.url) ? h.url : `https://${h.url}`;
    let u: URL;
    try {
      u = new URL(raw);
    } catch {
      throw new HostsConfigError(`${file}:${h.line}: ${JSON.stringify(h.url)} is not a URL`);
    }
    if (u.protocol !== 'https:' && u.protocol !== 'http:') throw new HostsConfigError(`${file}:${h.line}: ${JSON.stringify(h.url)}: only http and https hosts are supported`);
    let p = u.pathname === '/' ? '' : path.posix.normalize(u.pathname).replace(/\/+$/, '');
    if (!h.overridePath && !p.endsWith('/v2')) p = `${p}/v2`;
    const host = u.host;
    return {
      scheme: u.protocol === 'http:' ? 'http' : 'https',
      host,
      path: p,
      capabilities: h.capabilities ? new Set(h.capabilities) : ALL,
      ...this.tlsOf(dir, h, file),
      headers: h.headers,
      mirror: host !== apiHost(registryHost) && host !== registryHost,
      implicit: false,
    };
  }

  private tlsOf(dir: string, h: RawHost, file: string): Pick<RegistryEndpoint, 'ca' | 'client' | 'skipVerify' | 'headers'> {
    const read = (p: string, what: string): Buffer => {
      const full = path.isAbsolute(p) ? p : path.join(dir, p);
      this.deps.push(full);
      try {
        return fs.readFileSync(full);
      } catch (err) {
        throw new HostsConfigError(`${file}: ${what} ${full}: ${(err as Error).message}`);
      }
    };
    const ca = (h.ca ?? []).map((p) => read(p, 'ca'));
    const pair = h.client?.[0] ?? null;
    let client: RegistryEndpoint['client'] = null;
    if (pair) {
      const cert = read(pair[0], 'client certificate');
      // A single file holds both (containerd's form without a key path).
      client = { cert, key: pair[1] ? read(pair[1], 'client key') : cert };
    }
    return { ca, client, skipVerify: h.skipVerify ?? false, headers: h.headers };
  }

  /** A directory without hosts.toml: docker's certs.d files (`*.crt` CAs, `*.cert` + `*.key` client pairs) for the registry itself. */
  private withCertsDir(e: RegistryEndpoint, dir: string): RegistryEndpoint {
    const names = fs.readdirSync(dir).sort();
    const read = (n: string) => {
      this.deps.push(path.join(dir, n));
      return fs.readFileSync(path.join(dir, n));
    };
    const ca = names.filter((n) => n.endsWith('.crt')).map(read);
    const certName = names.find((n) => n.endsWith('.cert') && names.includes(`${n.slice(0, -5)}.key`));
    const client = certName ? { cert: read(certName), key: read(`${certName.slice(0, -5)}.key`) } : null;
    return { ...e, ca, client };
  }
}

/** Each file's mtime and size (or its absence), to see whether any changed. */
function filesStamp(files: string[]): string {
  return files
    .map((f) => {
      try {
        const st = fs.statSync(f);
        return `\0${f}:${st.mtimeMs}:${st.size}`;
      } catch {
        return `\0${f}:gone`;
      }
    })
    .join('');
}

/** A string or a list of strings as a list; null for anything else. */
function strings(v: TomlValue): string[] | null {
  if (v.kind === 'string') return [v.value];
  if (v.kind === 'array' && v.items.every((i) => i.kind === 'string')) return v.items.map((i) => (i as { value: string }).value);
  return null;
}
