import { SnapshotterError } from '../errdefs/errors';
import { digestProblem } from './digest';

/**
 * Image references as docker, containerd and skopeo spell them:
 *
 *   alpine                                  → docker.io/library/alpine:latest
 *   docker.io/library/alpine:3.19
 *   127.0.0.1:5000/bench/python-b:latest
 *   host/repo@sha256:<64 hex>               (by digest, no tag)
 *   host/repo:tag@sha256:<64 hex>           (the digest is what is fetched)
 *
 * The rules follow github.com/distribution/reference: the first path
 * component is a registry host when it contains "." or ":", is "localhost",
 * or has uppercase letters; otherwise the reference is on Docker Hub, whose
 * one-component names live under "library/".
 */

/** The name Docker Hub references carry. */
export const DOCKER_HUB_DOMAIN = 'docker.io';
/** The host Docker Hub's registry API is served from. */
export const DOCKER_HUB_HOST = 'registry-1.docker.io';
/** Other spellings of Docker Hub (docker's config.json keys use the first). */
export const DOCKER_HUB_ALIASES: readonly string[] = ['index.docker.io', 'registry-1.docker.io', 'registry.hub.docker.com'];

/** Longest name (domain/repository), as in distribution/reference. */
const NAME_MAX = 255;

export class InvalidReferenceError extends SnapshotterError {
  constructor(
    readonly reference: string,
    reason: string,
  ) {
    super('InvalidArgument', `invalid image reference ${JSON.stringify(reference.length > 300 ? `${reference.slice(0, 300)}…` : reference)}: ${reason}`);
    this.name = 'InvalidReferenceError';
  }
}

/** A repository in a registry, without tag or digest. */
export interface RepositoryName {
  /** Registry name as references spell it ("docker.io", "127.0.0.1:5000"). */
  readonly domain: string;
  /** Host (and port) the registry API is reached at ("registry-1.docker.io" for docker.io). */
  readonly host: string;
  /** Repository path inside the registry ("library/alpine", "bench/python-b"). */
  readonly repository: string;
  /** `domain/repository`. */
  readonly name: string;
}

export interface Reference extends RepositoryName {
  /** The tag, or null for a reference by digest only. */
  readonly tag: string | null;
  /** The digest, or null; when set it is what is fetched, even if a tag is also given. */
  readonly digest: string | null;
}

// domain: DNS labels (letters, digits, inner dashes) separated by dots, or a
// bracketed IPv6 address; then an optional port.
const DOMAIN_RE = /^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$/;
// one path component: lowercase alphanumerics separated by ".", "_", "__" or dashes.
const COMPONENT_RE = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG_RE = /^[\w][\w.-]{0,127}$/;

/** The API host of a registry domain (Docker Hub's name is not its API host). */
export function registryHost(domain: string): string {
  const d = domain.toLowerCase();
  return d === DOCKER_HUB_DOMAIN || d === 'index.docker.io' ? DOCKER_HUB_HOST : domain;
}

function splitDomain(input: string, name: string): { domain: string; repository: string } {
  const slash = name.indexOf('/');
  const first = slash < 0 ? '' : name.slice(0, slash);
  const isDomain = slash >= 0 && (first.includes('.') || first.includes(':') || first === 'localhost' || first !== first.toLowerCase());
  let domain = isDomain ? first : DOCKER_HUB_DOMAIN;
  let repository = isDomain ? name.slice(slash + 1) : name;
  if (isDomain) {
    if (!DOMAIN_RE.test(domain)) throw new InvalidReferenceError(input, `registry host "${domain}" is not a valid host[:port]`);
    const port = /:([0-9]+)$/.exec(domain);
    if (port && Number(port[1]) > 65535) throw new InvalidReferenceError(input, `registry port ${port[1]} is out of range`);
    if (domain === 'index.docker.io') domain = DOCKER_HUB_DOMAIN;
  }
  if (domain === DOCKER_HUB_DOMAIN && repository !== '' && !repository.includes('/')) repository = `library/${repository}`;
  return { domain, repository };
}

function checkRepository(input: string, repository: string): void {
  if (repository === '') throw new InvalidReferenceError(input, 'repository name is empty');
  for (const c of repository.split('/')) {
    if (c === '') throw new InvalidReferenceError(input, `repository "${repository}" has an empty path component`);
    if (c !== c.toLowerCase() && COMPONENT_RE.test(c.toLowerCase())) {
      throw new InvalidReferenceError(input, `repository name must be lowercase, got "${repository}"`);
    }
    if (!COMPONENT_RE.test(c)) {
      throw new InvalidReferenceError(
        input,
        `repository path component "${c}" is invalid (lowercase letters and digits, separated by ".", "_", "__" or "-")`,
      );
    }
  }
}

function basicChecks(input: unknown): asserts input is string {
  if (typeof input !== 'string') throw new InvalidReferenceError(String(input), 'expected a string');
  if (input === '') throw new InvalidReferenceError(input, 'reference is empty');
  if (/\s/.test(input)) throw new InvalidReferenceError(input, 'reference contains whitespace');
  if (/^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//.test(input)) {
    throw new InvalidReferenceError(input, 'a reference has no scheme (drop "https://"; plain-HTTP registries are listed in registry.plain_http_hosts)');
  }
}

function repositoryName(input: string, domain: string, repository: string): RepositoryName {
  checkRepository(input, repository);
  const name = `${domain}/${repository}`;
  if (name.length > NAME_MAX) throw new InvalidReferenceError(input, `name is ${name.length} characters, at most ${NAME_MAX} are allowed`);
  return { domain, host: registryHost(domain), repository, name };
}

/** Parses an image reference; throws an InvalidReferenceError saying what is wrong. */
export function parseReference(input: string): Reference {
  basicChecks(input);
  let rest = input;
  let digest: string | null = null;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (digest === '') throw new InvalidReferenceError(input, 'digest after "@" is empty');
    const problem = digestProblem(digest);
    if (problem) throw new InvalidReferenceError(input, `digest "${digest}": ${problem}`);
  }
  let tag: string | null = null;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG_RE.test(tag)) {
      throw new InvalidReferenceError(input, `tag "${tag}" is invalid (1 to 128 of letters, digits, "_", "." and "-", not starting with "." or "-")`);
    }
  }
  if (rest === '') throw new InvalidReferenceError(input, 'repository name is empty');
  const { domain, repository } = splitDomain(input, rest);
  const repo = repositoryName(input, domain, repository);
  if (tag === null && digest === null) tag = 'latest';
  return { ...repo, tag, digest };
}

/**
 * Parses a repository name (`host/path` or a Docker Hub short name), with
 * no tag or digest.
 */
export function parseRepository(input: string): RepositoryName {
  basicChecks(input);
  if (input.includes('@')) throw new InvalidReferenceError(input, 'expected a repository name without a digest');
  const colon = input.lastIndexOf(':');
  if (colon > input.lastIndexOf('/')) throw new InvalidReferenceError(input, 'expected a repository name without a tag');
  const { domain, repository } = splitDomain(input, input);
  return repositoryName(input, domain, repository);
}

/** The canonical string: `domain/repository[:tag][@digest]`. */
export function formatReference(ref: Reference): string {
  return `${ref.name}${ref.tag !== null ? `:${ref.tag}` : ''}${ref.digest !== null ? `@${ref.digest}` : ''}`;
}
