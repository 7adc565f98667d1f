import fs from 'node:fs';
import path from 'node:path';
import { addToConfig, newConfig, parseContainerdVersion, removeProxyPlugin } from '../containerd/config-toml';

const USAGE = `usage: dedup-snapshotter containerd-config add|remove FILE [--address SOCKET] [--runc-wrapper PATH] [--containerd-version N] [--diff-service]

add     adds to FILE (containerd's config.toml) what it lacks of:
          [proxy_plugins.dedup] (type snapshot, address SOCKET), exporting
          enable_remote_snapshot_annotations = "true" (an existing table
          without it gets its exports table added right after it);
          for containerd 2.x (a version = 3 FILE, or --containerd-version 2
          or more): the transfer service's unpack_config entry for dedup
          (linux/<arch>), and one for overlayfs when FILE lists none (a list
          replaces containerd's default one);
          --runc-wrapper: CRI's runc runtime with BinaryName = PATH (KSM for
          containers), when FILE has no runc runtime table (else says what to set);
          --diff-service (containerd 1.7 and later): the diff service asks
          dedup-differ first (default = ["dedup-differ", "walking"]) and
          [proxy_plugins.dedup-differ]: on 1.7 ctr and CRI pulls then unpack
          dedup's layers in one pass, and commits of dedup containers go
          through the daemon; while the daemon is stopped every pull through
          the diff service fails (overlayfs's too), so it is not the default
        a missing FILE is created: version = 3 for --containerd-version 2
        or more, else version = 2. A second add changes nothing.
remove  takes out what add put there: the proxy plugin's tables (and a
        [proxy_plugins] table left empty), the unpack_config entry for dedup,
        the overlayfs entry add wrote when no other entry would be left (an
        overlayfs entry otherwise stays: it is containerd's default), the
        runc runtime table add --runc-wrapper put there, the diff service's
        table add --diff-service put there; every other line
        stays; says what else still names the snapshotter (CRI's snapshotter
        = "dedup", a BinaryName naming dedup-runc, a diff service list naming
        dedup-differ, inline tables)
Either way FILE is backed up first (FILE.bak-dedup-<time>) and replaced in
one rename. SOCKET: the daemon's (default /run/containerd/dedup-snapshotter.sock).
N: containerd's version (2, 2.1.9, or what containerd --version prints).
For install.sh and uninstall.sh.
`;

function stamp(): string {
  return new Date().toISOString().replace(/[-:]/g, '').replace(/\..*$/, '').replace('T', '');
}

/** Writes `text` over `file` in one rename, keeping its mode; the old file is copied aside first. */
function replaceWithBackup(file: string, text: string): string {
  const backup = `${file}.bak-dedup-${stamp()}`;
  fs.copyFileSync(file, backup);
  const mode = fs.statSync(file).mode & 0o7777;
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.dedup-tmp`);
  fs.writeFileSync(tmp, text, { mode });
  fs.renameSync(tmp, file);
  return backup;
}

export async function runContainerdConfig(args: string[]): Promise<number> {
  const [verb, file, ...rest] = args;
  if (verb === '--help' || verb === '-h') {
    process.stdout.write(USAGE);
    return 0;
  }
  let address = '/run/containerd/dedup-snapshotter.sock';
  let wrapper: string | null = null;
  let major: number | null = null;
  let minor: number | null = null;
  let diffService = false;
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--address' && rest[i + 1] && path.isAbsolute(rest[i + 1])) address = rest[++i];
    else if (rest[i] === '--runc-wrapper' && rest[i + 1] && path.isAbsolute(rest[i + 1])) wrapper = rest[++i];
    else if (rest[i] === '--containerd-version' && rest[i + 1] !== undefined) {
      const v = rest[++i];
      // A bare number or version, or containerd --version's whole line.
      const parsed = /^v?[0-9]/.test(v) ? parseContainerdVersion(`containerd ${v}`) : parseContainerdVersion(v);
      if (!parsed) {
        process.stderr.write(`dedup-snapshotter containerd-config: --containerd-version ${JSON.stringify(v)} is not a version (e.g. 2, 2.1.9, 1.7.24)\n`);
        return 2;
      }
      major = parsed.major;
      minor = parsed.minor;
    } else if (rest[i] === '--diff-service') {
      diffService = true;
    } else {
      process.stderr.write(`dedup-snapshotter containerd-config: unknown argument ${JSON.stringify(rest[i])}\n${USAGE}`);
      return 2;
    }
  }
  if ((verb !== 'add' && verb !== 'remove') || !file) {
    process.stderr.write(USAGE);
    return 2;
  }
  const say = (s: string) => process.stdout.write(`${s}\n`);
  const opts = { address, wrapper, containerdMajor: major, containerdMinor: minor, diffService };
  if (!fs.existsSync(file)) {
    if (verb === 'remove') {
      say(`${file} does not exist: nothing to remove`);
      return 0;
    }
    const r = newConfig(opts);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, r.text ?? '', { mode: 0o644 });
    say(`wrote ${file} (version ${(major ?? 0) >= 2 ? 3 : 2}) with ${r.added.join(' and ')}`);
    return 0;
  }
  const text = fs.readFileSync(file, 'utf8');
  if (verb === 'add') {
    const r = addToConfig(text, opts);
    for (const n of r.notes) say(`${file} ${n}`);
    if (r.text === null) say(`nothing to add to ${file}: unchanged`);
    else {
      const backup = replaceWithBackup(file, r.text);
      say(`added ${r.added.join(' and ')} to ${file}; the previous file is ${backup}`);
    }
    return 0;
  }
  const edit = removeProxyPlugin(text);
  if (edit.removed.length === 0) {
    say(`${file} has none of the snapshotter's tables: nothing to remove`);
  } else {
    const backup = replaceWithBackup(file, edit.text);
    say(`removed the snapshotter's tables from ${file} (lines ${edit.removed.join(', ')}); the previous file is ${backup}`);
  }
  for (const n of edit.notes) say(`kept in ${file}: ${n}`);
  for (const l of edit.leftovers) say(`still in ${file}: ${l}`);
  return 0;
}
