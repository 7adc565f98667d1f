import fs from 'node:fs';
import path from 'node:path';
import { hasProxyPlugin, proxyPluginSection, removeProxyPlugin, runcWrapperSection } from '../containerd/config-toml';

const USAGE = `usage: dedup-snapshotter containerd-config add|remove FILE [--address SOCKET] [--runc-wrapper PATH]

add     appends containerd's [proxy_plugins.dedup] table to FILE (containerd's
        config.toml) unless it has one; a missing FILE is created (version = 2)
        --runc-wrapper: also CRI's runc runtime with BinaryName = PATH (KSM for
        containers), when FILE has no runc runtime table (else says what to set)
remove  takes that table out of FILE, and a [proxy_plugins] table left empty,
        leaving every other line as it was; says what else still names the
        snapshotter (CRI's snapshotter = "dedup", a BinaryName naming dedup-runc);
        the runc runtime table add --runc-wrapper put there goes too
Either way FILE is backed up first (FILE.bak-dedup-<time>) and replaced in
one rename. SOCKET: the daemon's (default /run/containerd/dedup-snapshotter.sock).
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
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--address' && rest[i + 1] && path.isAbsolute(rest[i + 1])) address = rest[++i];
    else if (rest[i] === '--runc-wrapper' && rest[i + 1] && path.isAbsolute(rest[i + 1])) wrapper = rest[++i];
    else {
      process.stderr.write(`dedup-snapshotter containerd-config: unknown argument ${JSON.stringify(rest[i])}\n${USAGE}`);
      return 2;
    }
  }
  if ((verb !== 'add' && verb !== 'remove') || !file) {
    process.stderr.write(USAGE);
    return 2;
  }
  const say = (s: string) => process.stdout.write(`${s}\n`);
  if (!fs.existsSync(file)) {
    if (verb === 'remove') {
      say(`${file} does not exist: nothing to remove`);
      return 0;
    }
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const runc = wrapper ? runcWrapperSection('', wrapper) : null;
    fs.writeFileSync(file, `version = 2\n${proxyPluginSection(address)}${runc ?? ''}`, { mode: 0o644 });
    say(`wrote ${file} with [proxy_plugins.dedup] (address ${address})${runc ? ` and CRI's runc runtime through ${wrapper}` : ''}`);
    return 0;
  }
  const text = fs.readFileSync(file, 'utf8');
  if (verb === 'add') {
    const added: string[] = [];
    let next = text.replace(/\n*$/, '\n');
    if (hasProxyPlugin(text)) say(`${file} already has [proxy_plugins.dedup]`);
    else {
      next += proxyPluginSection(address);
      added.push(`[proxy_plugins.dedup] (address ${address})`);
    }
    if (wrapper) {
      const runc = runcWrapperSection(text, wrapper);
      if (runc) {
        next += runc;
        added.push(`CRI's runc runtime through ${wrapper} (KSM for containers)`);
      } else if (!text.includes(wrapper)) {
        say(`${file} has its own runc runtime table: to make containers' memory mergeable, set BinaryName = ${JSON.stringify(wrapper)} in its options (docs/configuration.md, KSM)`);
      }
    }
    if (added.length > 0) {
      const backup = replaceWithBackup(file, next);
      say(`added ${added.join(' and ')} to ${file}; the previous file is ${backup}`);
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
  for (const l of edit.leftovers) say(`still in ${file}: ${l}`);
  return 0;
}
