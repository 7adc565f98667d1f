import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { DOCKER_HUB_ALIASES, DOCKER_HUB_DOMAIN } from './reference';

/**
 * Registry authentication pieces: credentials (from the caller or docker's
 * config.json), WWW-Authenticate challenges, a token cache, and a redactor
 * that keeps every secret the client has seen out of messages and logs.
 */

export interface Credentials {
  readonly username: string;
  readonly password: string;
}

/** Credentials for a registry host (`host[:port]`, as in references), or null. */
export type CredentialsProvider = (host: string) => Credentials | null;

/** The first provider that has credentials for the host wins. */
export function chainCredentials(...providers: (CredentialsProvider | null | undefined)[]): CredentialsProvider {
  const list = providers.filter((p): p is CredentialsProvider => typeof p === 'function');
  return (host) => {
    for (const p of list) {
      const c = p(host);
      if (c) return c;
    }
    return null;
  };
}

/**
 * The key docker's config.json would use for a host: scheme and path
 * dropped, lowercase, and every Docker Hub spelling (including
 * `https://index.docker.io/v1/`) folded to "docker.io".
 */
export function normalizeCredentialHost(key: string): string {
  let h = key.trim().toLowerCase();
  h = h.replace(/^[a-z][a-z0-9+.-]*:\/\//, '');
  const slash = h.indexOf('/');
  if (slash >= 0) h = h.slice(0, slash);
  if (h === DOCKER_HUB_DOMAIN || DOCKER_HUB_ALIASES.includes(h)) return DOCKER_HUB_DOMAIN;
  return h;
}

export class DockerConfigError extends Error {
  constructor(
    readonly file: string,
    message: string,
  ) {
    super(`docker config ${file}: ${message}`);
    this.name = 'DockerConfigError';
  }
}

/** `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. */
export function defaultDockerConfigPath(env: NodeJS.ProcessEnv = process.env): string {
  const dir = env.DOCKER_CONFIG && env.DOCKER_CONFIG !== '' ? env.DOCKER_CONFIG : path.join(env.HOME ?? os.homedir(), '.docker');
  return path.join(dir, 'config.json');
}

/**
 * Parses the `auths` of a docker config.json document. Each entry has
 * `auth` (base64 of `user:password`) or `username` and `password`. Entries
 * with neither (an `identitytoken` only, or a credential helper's empty
 * entry) are skipped: helpers (`credsStore`, `credHelpers`) are not run.
 * Error messages name the file and the key, never a value.
 */
export function parseDockerConfig(text: string, file: string): Map<string, Credentials> {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    // JSON.parse quotes the text around the error: it may be a secret.
    throw new DockerConfigError(file, 'not valid JSON');
  }
  const out = new Map<string, Credentials>();
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw new DockerConfigError(file, 'expected a JSON object at the top level');
  const auths = (doc as { auths?: unknown }).auths;
  if (auths === undefined) return out;
  if (typeof auths !== 'object' || auths === null || Array.isArray(auths)) throw new DockerConfigError(file, '"auths" must be an object');
  for (const [key, entry] of Object.entries(auths as Record<string, unknown>)) {
    const where = `auths[${JSON.stringify(key)}]`;
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) throw new DockerConfigError(file, `${where} must be an object`);
    const e = entry as { auth?: unknown; username?: unknown; password?: unknown };
    let creds: Credentials | null = null;
    if (typeof e.auth === 'string' && e.auth !== '') {
      const decoded = Buffer.from(e.auth, 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon <= 0 || !/^[A-Za-z0-9+/=\s]+$/.test(e.auth)) throw new DockerConfigError(file, `${where}.auth must be base64 of "username:password"`);
      creds = { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
    } else if (e.auth !== undefined && typeof e.auth !== 'string') {
      throw new DockerConfigError(file, `${where}.auth must be a string`);
    } else if (typeof e.username === 'string' && e.username !== '' && typeof e.password === 'string') {
      creds = { username: e.username, password: e.password };
    }
    if (creds) out.set(normalizeCredentialHost(key), creds);
  }
  return out;
}

/**
 * Credentials from a docker config.json file (read once, now). A missing
 * file gives no credentials, as docker does; an unreadable or malformed one
 * throws a DockerConfigError.
 */
export function loadDockerConfigCredentials(file: string = defaultDockerConfigPath()): CredentialsProvider {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return () => null;
    throw new DockerConfigError(file, `cannot read: ${(err as Error).message}`);
  }
  const map = parseDockerConfig(text, file);
  return (host) => map.get(normalizeCredentialHost(host)) ?? null;
}

export function basicAuthorization(c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`, 'utf8').toString('base64')}`;
}

export interface Challenge {
  /** Lowercase scheme: "bearer", "basic", ... */
  readonly scheme: string;
  /** Parameters with lowercase names (realm, service, scope, error...). */
  readonly params: Readonly<Record<string, string>>;
}

/**
 * Parses WWW-Authenticate values (RFC 7235): one or more challenges, each a
 * scheme and comma-separated `name=value` or `name="quoted, value"`
 * parameters. Unparseable trailing input is ignored; a challenge without a
 * scheme is dropped.
 */
export function parseWwwAuthenticate(values: string | readonly string[] | undefined): Challenge[] {
  const out: Challenge[] = [];
  for (const value of typeof values === 'string' ? [values] : (values ?? [])) {
    let i = 0;
    const s = value;
    const skipWs = () => {
      while (i < s.length && (s[i] === ' ' || s[i] === '\t')) i++;
    };
    const token = () => {
      const m = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+/.exec(s.slice(i));
      if (!m) return '';
      i += m[0].length;
      return m[0];
    };
    let current: { scheme: string; params: Record<string, string> } | null = null;
    while (i < s.length) {
      skipWs();
      if (s[i] === ',') {
        i++;
        continue;
      }
      const start = i;
      const name = token();
      if (name === '') break;
      skipWs();
      if (s[i] === '=') {
        // name=value: a parameter of the current challenge (or token68 padding).
        i++;
        skipWs();
        let val = '';
        if (s[i] === '"') {
          i++;
          while (i < s.length && s[i] !== '"') {
            if (s[i] === '\\' && i + 1 < s.length) i++;
            val += s[i];
            i++;
          }
          i++; // closing quote
        } else {
          val = token();
        }
        if (current) current.params[name.toLowerCase()] = val;
        continue;
      }
      // A new scheme (possibly followed by a token68, which is ignored).
      if (start !== i) {
        current = { scheme: name.toLowerCase(), params: {} };
        out.push(current);
      }
    }
  }
  return out;
}

/** A cached bearer token and when to stop using it. */
interface CachedToken {
  token: string;
  expiresAt: number;
}

/**
 * Bearer tokens per registry host and scope set, kept until shortly before
 * their expiry (`expires_in`, 60 s when absent, as the token spec says).
 */
export class TokenCache {
  private readonly tokens = new Map<string, CachedToken>();
  constructor(private readonly now: () => number = Date.now) {}

  static key(host: string, scopes: readonly string[]): string {
    return `${host}|${[...scopes].sort().join(' ')}`;
  }

  get(host: string, scopes: readonly string[]): string | null {
    const k = TokenCache.key(host, scopes);
    const t = this.tokens.get(k);
    if (!t) return null;
    if (this.now() >= t.expiresAt) {
      this.tokens.delete(k);
      return null;
    }
    return t.token;
  }

  set(host: string, scopes: readonly string[], token: string, expiresInSec: number): void {
    // Stop using a token a little before the registry does: 10% of its life, at most 10 s.
    const lifeMs = expiresInSec * 1000;
    const expiresAt = this.now() + lifeMs - Math.min(10_000, lifeMs / 10);
    this.tokens.set(TokenCache.key(host, scopes), { token, expiresAt });
  }

  delete(host: string, scopes: readonly string[]): void {
    this.tokens.delete(TokenCache.key(host, scopes));
  }

  clear(): void {
    this.tokens.clear();
  }
}

/**
 * Replaces every secret the client has handled (passwords, `user:password`
 * and its base64, tokens) with "[REDACTED]". Messages and log fields pass
 * through it before they leave the client.
 */
export class Redactor {
  private readonly secrets = new Set<string>();

  add(secret: string | null | undefined): void {
    // Very short strings would mangle ordinary text; they are not worth hiding.
    if (typeof secret === 'string' && secret.length >= 3) this.secrets.add(secret);
  }

  addCredentials(c: Credentials): void {
    this.add(c.password);
    this.add(`${c.username}:${c.password}`);
    this.add(basicAuthorization(c).slice('Basic '.length));
    this.add(encodeURIComponent(c.password));
  }

  redact(text: string): string {
    let out = text;
    // Longest first, so that a secret containing another is hidden whole.
    for (const s of [...this.secrets].sort((a, b) => b.length - a.length)) {
      if (out.includes(s)) out = out.split(s).join('[REDACTED]');
    }
    // Authorization values in echoed text, whatever they are.
    return out.replace(/\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}/gi, '$1 [REDACTED]');
  }
}
