/**
 * The proxy plugin's table in containerd's config.toml, added and taken out
 * by line (install.sh, uninstall.sh): every other line stays as it was.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { runContainerdConfig } from '../src/cmd/containerd-config';
import { addToConfig, hasProxyDiffers, hasProxyPlugin, newConfig, parseContainerdVersion, platformOf, proxyPluginSection, removeProxyPlugin, runcWrapperSection } from '../src/containerd/config-toml';
import { readContainerdToml } from '../src/containerd/toml-reader';

const OTHER = `version = 2
# the operator's own settings
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
`;

describe("containerd's config: the proxy plugin table", () => {
  test('added then removed: the file is as it was, byte for byte', () => {
    const added = `${OTHER}${proxyPluginSection('/run/containerd/dedup-snapshotter.sock')}`;
    assert.ok(hasProxyPlugin(added));
    const r = removeProxyPlugin(added);
    assert.equal(r.text, OTHER);
    assert.deepEqual(r.leftovers, []);
    assert.ok(!hasProxyPlugin(r.text));
  });

  test('the file install.sh writes (and the docs show): the emptied [proxy_plugins] goes too', () => {
    const text = `version = 2

# dedup-snapshotter: containerd's proxy plugin for the "dedup" snapshotter.
[proxy_plugins]
  [proxy_plugins.dedup]
    type = "snapshot"
    address = "/run/containerd/dedup-snapshotter.sock"
`;
    const r = removeProxyPlugin(text);
    assert.doesNotMatch(r.text, /proxy_plugins/);
    assert.match(r.text, /^version = 2\n/);
  });

  test('another proxy plugin stays, with its [proxy_plugins] table; a quoted name is found', () => {
    const text = `${OTHER}
[proxy_plugins]
  [proxy_plugins."dedup"]
    type = "snapshot"
    address = "/run/containerd/dedup-snapshotter.sock"

  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
`;
    const r = removeProxyPlugin(text);
    assert.equal(
      r.text,
      `${OTHER}
[proxy_plugins]

  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
`,
    );
  });

  test("what it cannot edit is named: CRI's snapshotter = \"dedup\", an inline table", () => {
    const text = `version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "dedup"
[proxy_plugins]
  dedup = { type = "snapshot", address = "/run/containerd/dedup-snapshotter.sock" }
`;
    assert.ok(hasProxyPlugin(text), 'an inline table defines the plugin: add appends no second one');
    const r = removeProxyPlugin(text);
    assert.equal(r.text, text, 'nothing removed');
    assert.equal(r.leftovers.length, 2);
    assert.match(r.leftovers[0], /^line 3: snapshotter = "dedup" \(CRI uses the dedup snapshotter/);
    assert.match(r.leftovers[1], /^line 5: dedup = \{.*inline proxy plugin table/);
  });

  test('the runc runtime through dedup-runc (KSM): added only where no runc table is, taken out again; a BinaryName set by hand is named', () => {
    const wrapper = '/opt/dedup-snapshotter/bin/dedup-runc';
    const runc = runcWrapperSection(OTHER, wrapper) as string;
    assert.match(runc, /\[plugins\."io\.containerd\.grpc\.v1\.cri"\.containerd\.runtimes\.runc\.options\]\n {4}BinaryName = "\/opt\/dedup-snapshotter\/bin\/dedup-runc"/);
    const added = `${OTHER}${proxyPluginSection('/run/containerd/dedup-snapshotter.sock')}${runc}`;
    const r = removeProxyPlugin(added);
    assert.equal(r.text, OTHER);
    assert.deepEqual(r.leftovers, []);
    // containerd 2.x's version 3 file: its CRI runtime plugin's name.
    assert.match(runcWrapperSection('version = 3\n', wrapper) as string, /\[plugins\."io\.containerd\.cri\.v1\.runtime"\.containerd\.runtimes\.runc\]/);
    // The operator's own runc table: not added to (a second table would be invalid TOML).
    const own = `${OTHER}[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n  runtime_type = "io.containerd.runc.v2"\n  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n    SystemdCgroup = true\n    BinaryName = "${wrapper}"\n`;
    assert.equal(runcWrapperSection(own, wrapper), null);
    const left = removeProxyPlugin(own);
    assert.equal(left.text, own, 'the operator\'s table stays');
    assert.equal(left.leftovers.length, 1);
    assert.match(left.leftovers[0], /^line 11: BinaryName = .*dedup-runc.*containers would fail to start once dedup-runc is gone/);
  });

  test('a file without the table is left alone', () => {
    const r = removeProxyPlugin(OTHER);
    assert.equal(r.text, OTHER);
    assert.deepEqual(r.removed, []);
  });
});

/** containerd 2.x: the transfer service's unpack_config and the plugin's exports, in version 3 and version 2 files. */
describe("containerd's config for containerd 2.x", () => {
  const ADDR = '/run/containerd/dedup-snapshotter.sock';
  const amd = { address: ADDR, platform: 'linux/amd64' };

  test('a version 3 file: unpack_config for dedup and overlayfs, the plugin with its exports; a second add adds nothing; remove gives the file back', () => {
    const before = "version = 3\n# mine\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = \"overlayfs\"\n";
    const r = addToConfig(before, amd);
    assert.ok(r.text);
    const text = r.text as string;
    assert.ok(text.startsWith(before), 'existing lines stay as they were');
    assert.equal(
      text.slice(before.length),
      [
        '',
        '# added by dedup-snapshotter install.sh: the transfer service (containerd 2.x pulls) unpacks for dedup',
        "[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]",
        '  platform = "linux/amd64"',
        '  snapshotter = "dedup"',
        '  differ = "dedup-differ"',
        '',
        "# added by dedup-snapshotter install.sh: overlayfs, containerd's default, which a list without it leaves out",
        "[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]",
        '  platform = "linux/amd64"',
        '  snapshotter = "overlayfs"',
        '',
        '# added by dedup-snapshotter install.sh',
        '[proxy_plugins.dedup]',
        '  type = "snapshot"',
        `  address = "${ADDR}"`,
        '  [proxy_plugins.dedup.exports]',
        '    enable_remote_snapshot_annotations = "true"',
        '',
        '# added by dedup-snapshotter install.sh: layers unpack in one pass through the daemon (containerd 2.x)',
        '[proxy_plugins.dedup-differ]',
        '  type = "diff"',
        `  address = "${ADDR}"`,
        '',
      ].join('\n'),
    );
    const facts = readContainerdToml(text);
    assert.deepEqual(
      facts.unpackConfig.map((e) => [e.snapshotter, e.platform, e.differ, e.inline]),
      [
        ['dedup', 'linux/amd64', 'dedup-differ', false],
        ['overlayfs', 'linux/amd64', undefined, false],
      ],
    );
    assert.equal(facts.plugins.get('dedup')?.exports.get('enable_remote_snapshot_annotations'), 'true');
    assert.equal(facts.plugins.get('dedup-differ')?.type, 'diff');
    assert.equal(facts.plugins.get('dedup-differ')?.address, ADDR);
    const again = addToConfig(text, amd);
    assert.equal(again.text, null, 'idempotent');
    assert.match(again.notes.join('\n'), /already has an unpack_config entry for "dedup" \(line 7, platform linux\/amd64\)/);
    const rm = removeProxyPlugin(text);
    assert.equal(rm.text, before, 'byte for byte');
    assert.deepEqual(rm.notes, [], "install.sh's overlayfs entry, alone once dedup's is gone, goes too: containerd's default list has it");
  });

  test('a version 2 file: nothing for the transfer service unless containerd is 2.x, then double-quoted names', () => {
    const before = 'version = 2\n';
    const old = addToConfig(before, { ...amd, containerdMajor: 1 }).text as string;
    assert.doesNotMatch(old, /unpack_config/);
    assert.match(old, /\[proxy_plugins\.dedup\.exports\]\n {4}enable_remote_snapshot_annotations = "true"/, 'exports for every version: 1.x ignores it');
    const two = addToConfig(before, { ...amd, containerdMajor: 2 }).text as string;
    assert.match(two, /\[\[plugins\."io\.containerd\.transfer\.v1\.local"\.unpack_config\]\]\n {2}platform = "linux\/amd64"\n {2}snapshotter = "dedup"/);
    assert.doesNotMatch(two, /'io\.containerd/);
    assert.doesNotMatch(old, /dedup-differ/, 'containerd 1.x has no proxy differs');
    // The 1.x file taken to 2.x later: only the unpack_config entries and the differ are added.
    const upgraded = addToConfig(old, { ...amd, containerdMajor: 2 });
    assert.deepEqual(upgraded.added, [
      'the transfer service\'s unpack_config entries for "dedup" and "overlayfs" (linux/amd64)',
      `[proxy_plugins.dedup-differ] (type "diff", address ${ADDR})`,
    ]);
    assert.equal(removeProxyPlugin(upgraded.text as string).text, before);
    assert.equal(newConfig({ ...amd, containerdMajor: 2 }).text?.split('\n')[0], 'version = 3');
    assert.equal(newConfig({ ...amd, containerdMajor: 1 }).text?.split('\n')[0], 'version = 2');
  });

  test("an existing unpack_config entry for dedup without a differ gets differ = \"dedup-differ\" (and the differ's table); remove takes both out", () => {
    const before = `version = 3\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = "linux/amd64"\n  snapshotter = "dedup"\n\n[proxy_plugins.dedup]\n  type = "snapshot"\n  address = "${ADDR}"\n  [proxy_plugins.dedup.exports]\n    enable_remote_snapshot_annotations = "true"\n`;
    const r = addToConfig(before, amd);
    assert.deepEqual(r.added, ['differ = "dedup-differ" to that entry (line 4)', `[proxy_plugins.dedup-differ] (type "diff", address ${ADDR})`]);
    const f = readContainerdToml(r.text as string);
    assert.equal(f.unpackConfig[0].differ, 'dedup-differ');
    assert.equal(f.plugins.get('dedup-differ')?.type, 'diff');
    assert.equal(addToConfig(r.text as string, amd).text, null, 'idempotent');
    const rm = removeProxyPlugin(r.text as string);
    assert.doesNotMatch(rm.text, /dedup/);
    const other = addToConfig(before.replace('snapshotter = "dedup"', 'snapshotter = "dedup"\n  differ = "walking"'), amd);
    assert.match(other.notes.join('\n'), /names differ = "walking": left so/);
  });

  test('--diff-service: containerd 1.7 gets the diff service\'s list (dedup-differ first) and the differ\'s table; 1.6 and an unknown 1.x get a note; remove gives the file back', () => {
    const before = 'version = 2\n';
    const r17 = addToConfig(before, { ...amd, containerdMajor: 1, containerdMinor: 7, diffService: true });
    assert.deepEqual(r17.added.slice(1), ['the diff service\'s list asking "dedup-differ" first, then "walking"', `[proxy_plugins.dedup-differ] (type "diff", address ${ADDR})`]);
    const f = readContainerdToml(r17.text as string);
    assert.deepEqual(f.diffService?.default, ['dedup-differ', 'walking']);
    assert.match(r17.text as string, /\[plugins\."io\.containerd\.service\.v1\.diff-service"\]\n {2}default = \["dedup-differ", "walking"\]/);
    assert.equal(f.plugins.get('dedup-differ')?.type, 'diff');
    assert.doesNotMatch(r17.text as string, /unpack_config/, '1.7 has no unpack_config to set');
    assert.equal(addToConfig(r17.text as string, { ...amd, containerdMajor: 1, containerdMinor: 7, diffService: true }).text, null, 'idempotent');
    assert.equal(removeProxyPlugin(r17.text as string).text, before);
    // Version 3 (2.x): single-quoted table name.
    const v3 = addToConfig('version = 3\n', { ...amd, diffService: true }).text as string;
    assert.match(v3, /\[plugins\.'io\.containerd\.service\.v1\.diff-service'\]\n {2}default = \["dedup-differ", "walking"\]/);
    assert.equal(removeProxyPlugin(v3).text, 'version = 3\n');
    // 1.6 refuses proxy differs (containerd then fails to start its diff service): only a note.
    const r16 = addToConfig(before, { ...amd, containerdMajor: 1, containerdMinor: 6, diffService: true });
    assert.doesNotMatch(r16.text as string, /diff-service|dedup-differ/);
    assert.match(r16.notes.join('\n'), /1\.6 has no proxy differs/);
    assert.match(addToConfig(before, { ...amd, containerdMajor: 1, diffService: true }).notes.join('\n'), /cannot tell whether this containerd takes proxy differs/);
    // The operator's own diff service list is left alone, and named; remove names a list that still names the differ.
    const own = `${before}[plugins."io.containerd.service.v1.diff-service"]\n  default = ["walking"]\n`;
    const rOwn = addToConfig(own, { ...amd, containerdMajor: 1, containerdMinor: 7, diffService: true });
    assert.match(rOwn.notes.join('\n'), /line 3: the diff service's settings are the file's own \(default = \["walking"\]\): left so; for --diff-service set default = \["dedup-differ", "walking"\]/);
    assert.doesNotMatch(rOwn.text as string, /dedup-differ/, 'no differ table for a list that does not name it');
    const byHand = `${before}[plugins."io.containerd.service.v1.diff-service"]\n  default = [\n    "dedup-differ",\n    "walking",\n  ]\n`;
    const rHand = addToConfig(byHand, { ...amd, containerdMajor: 1, containerdMinor: 7, diffService: true });
    assert.match(rHand.notes.join('\n'), /already asks dedup-differ first \(line 3\)/);
    assert.ok(rHand.added.some((a) => /proxy_plugins\.dedup-differ/.test(a)), 'the differ its list names is added');
    const rm = removeProxyPlugin(rHand.text as string);
    assert.match(rm.text, /default = \[\n {4}"dedup-differ"/, 'a list written by hand stays');
    assert.match(rm.leftovers.join('\n'), /line 3: the diff service's list names "dedup-differ" \(take it out by hand/);
  });

  test('an existing [proxy_plugins.dedup] without exports gets its exports table right after it; one with exports is left alone', () => {
    const before = `version = 3\n[proxy_plugins]\n  [proxy_plugins.'dedup']   # the operator's\n    type = "snapshot"\n    address = "${ADDR}"\n\n  [proxy_plugins.other]\n    type = "snapshot"\n    address = "/run/other.sock"\n`;
    const r = addToConfig(before, amd);
    const lines = (r.text as string).split('\n');
    assert.deepEqual(lines.slice(0, 11), [
      'version = 3',
      '[proxy_plugins]',
      "  [proxy_plugins.'dedup']   # the operator's",
      '    type = "snapshot"',
      `    address = "${ADDR}"`,
      '    # added by dedup-snapshotter install.sh: pulls pass the remote-snapshot labels (containerd 2.x, lazy pulls)',
      '    [proxy_plugins.dedup.exports]',
      '      enable_remote_snapshot_annotations = "true"',
      '',
      '  [proxy_plugins.other]',
      '    type = "snapshot"',
    ]);
    assert.match(r.added.join('\n'), /enable_remote_snapshot_annotations to \[proxy_plugins\.dedup\]'s exports \(line 7\)/);
    assert.equal(readContainerdToml(r.text as string).plugins.get('dedup')?.exports.get('enable_remote_snapshot_annotations'), 'true');
    assert.equal(addToConfig(r.text as string, amd).text, null);

    // An exports table of its own (another key): the key goes into it.
    const own = `version = 2\n[proxy_plugins.dedup]\n  type = "snapshot"\n  address = "${ADDR}"\n  [proxy_plugins.dedup.exports]\n    foo = "bar"\n`;
    const o = addToConfig(own, amd);
    assert.equal(o.text, `${own.replace('    foo = "bar"\n', '')}    # added by dedup-snapshotter install.sh: pulls pass the remote-snapshot labels (containerd 2.x, lazy pulls)\n    enable_remote_snapshot_annotations = "true"\n    foo = "bar"\n`);
    // Set to something else: named, not changed.
    const off = addToConfig(own.replace('foo = "bar"', 'enable_remote_snapshot_annotations = "false"'), amd);
    assert.equal(off.text, null);
    assert.match(off.notes.join('\n'), /exports enable_remote_snapshot_annotations = "false": left so/);
    // Exports as an inline table: a [….exports] header would define them twice (invalid TOML): named, not edited.
    const inl = addToConfig(`version = 3\n[proxy_plugins.dedup]\n  type = "snapshot"\n  address = "${ADDR}"\n  exports = { foo = "bar" }\n`, amd);
    assert.ok(!(inl.text ?? '').includes('[proxy_plugins.dedup.exports]'), inl.text ?? '');
    assert.match(inl.notes.join('\n'), /sets its exports inline, not edited/);
    // remove takes the plugin out with all its tables: no orphan [proxy_plugins.dedup.exports] that would define it again.
    assert.doesNotMatch(removeProxyPlugin(r.text as string).text, /dedup/);
  });

  test('an unpack_config list naming another snapshotter: only dedup is added (overlayfs left out, as the operator had it, and said); remove leaves the list as it was', () => {
    const before = `version = 3\n[plugins."io.containerd.transfer.v1.local"]\n  max_concurrent_downloads = 5\n\n[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n  platform = "linux/amd64"\n  snapshotter = "stargz"\n  differ = "walking"\n`;
    const facts = readContainerdToml(before);
    assert.deepEqual(facts.unpackConfig, [{ line: 5, inline: false, platform: 'linux/amd64', snapshotter: 'stargz', differ: 'walking' }]);
    const r = addToConfig(before, amd);
    assert.deepEqual(readContainerdToml(r.text as string).unpackConfig.map((e) => e.snapshotter), ['stargz', 'dedup']);
    assert.match(r.notes.join('\n'), /its unpack_config list \(stargz\) has no overlayfs entry: left so/);
    assert.equal(removeProxyPlugin(r.text as string).text, before);

    // The operator's overlayfs entry stays on remove, and remove says so.
    const withOverlay = `version = 3\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = "linux/amd64"\n  snapshotter = "overlayfs"\n`;
    const a = addToConfig(withOverlay, amd);
    assert.deepEqual(readContainerdToml(a.text as string).unpackConfig.map((e) => e.snapshotter), ['overlayfs', 'dedup']);
    const rm = removeProxyPlugin(a.text as string);
    assert.equal(rm.text, withOverlay);
    assert.match(rm.notes.join('\n'), /^line 2: the unpack_config entry for overlayfs stays \(containerd's default snapshotter; not added by install\.sh\)/);

    // install.sh's overlayfs entry with another entry added since: kept (the list would leave overlayfs out otherwise).
    const grown = `${addToConfig('version = 3\n', amd).text}\n[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n  platform = "linux/amd64"\n  snapshotter = "stargz"\n`;
    const g = removeProxyPlugin(grown);
    assert.deepEqual(readContainerdToml(g.text).unpackConfig.map((e) => e.snapshotter), ['overlayfs', 'stargz']);
    assert.match(g.notes.join('\n'), /overlayfs stays .*other entries are listed too/);
  });

  test("the reader: single- and double-quoted plugin names, both CRI layouts, the version, what a version 2 CRI table needs on 2.x", () => {
    const v3 = `version = 3
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'dedup'   # lazy
  disable_snapshot_annotations = false
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "/etc/containerd/certs.d"
[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = 'linux/arm64'
  snapshotter = 'dedup'
[proxy_plugins.'dedup']
  type = 'snapshot'
  address = '${ADDR}'
[proxy_plugins.'dedup'.exports]
  enable_remote_snapshot_annotations = 'true'
`;
    const f = readContainerdToml(v3);
    assert.equal(f.version, 3);
    assert.deepEqual(f.cri.v3, { layout: 3, hasRuntimes: false, snapshotter: 'dedup', snapshotterLine: 3, disableSnapshotAnnotations: false });
    assert.equal(f.cri.v2, undefined);
    assert.deepEqual(f.unpackConfig, [{ line: 7, inline: false, platform: 'linux/arm64', snapshotter: 'dedup' }]);
    const p = f.plugins.get('dedup');
    assert.equal(p?.address, ADDR);
    assert.equal(p?.inline, false);
    assert.deepEqual([...(p?.exports ?? [])], [['enable_remote_snapshot_annotations', 'true']]);

    const v2 = `version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "dedup"\n  disable_snapshot_annotations = true\n  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n    runtime_type = "io.containerd.runc.v2"\n`;
    assert.deepEqual(readContainerdToml(v2).cri.v2, { layout: 2, hasRuntimes: true, snapshotter: 'dedup', snapshotterLine: 3, disableSnapshotAnnotations: true });
    assert.equal(readContainerdToml(v2.replace(/ {2}\[plugins[^\n]*runtimes\.runc\]\n[^\n]*\n/, '')).cri.v2?.hasRuntimes, false);
    // An array over several lines does not hide what follows it.
    const after = readContainerdToml(`imports = [\n  "/etc/a.toml", # one\n  "/etc/b.toml",\n]\nversion = 3\n`);
    assert.equal(after.version, 3);
    assert.equal(after.hasImports, true);
  });

  test('inline forms are read and reported, not edited: an inline unpack_config list, an inline proxy plugin', () => {
    const before = `version = 3
[plugins.'io.containerd.transfer.v1.local']
  unpack_config = [
    { platform = "linux/amd64", snapshotter = "overlayfs" },  # the default
    { platform = "linux/amd64", snapshotter = "stargz", differ = "" },
  ]
[proxy_plugins]
  dedup = { type = "snapshot", address = "${ADDR}" }
`;
    const f = readContainerdToml(before);
    assert.deepEqual(
      f.unpackConfig.map((e) => [e.snapshotter, e.line, e.inline]),
      [
        ['overlayfs', 3, true],
        ['stargz', 3, true],
      ],
    );
    assert.equal(f.unpackInlineLine, 3);
    assert.equal(f.plugins.get('dedup')?.inline, true);
    const r = addToConfig(before, amd);
    assert.equal(r.text, null, 'a [[…unpack_config]] next to an inline list would be invalid TOML; an inline table cannot take a table header');
    assert.match(r.notes.join('\n'), /line 3: an inline unpack_config list, not edited: add \{ platform = "linux\/amd64", snapshotter = "dedup" \} to it by hand/);
    assert.match(r.notes.join('\n'), /line 8: \[proxy_plugins\.dedup\] is an inline or dotted table, not edited: add exports = \{ enable_remote_snapshot_annotations = "true" \}/);
    const inlineOurs = before.replace('snapshotter = "stargz", differ = ""', 'snapshotter = "dedup"');
    const rm = removeProxyPlugin(inlineOurs);
    assert.equal(rm.text, inlineOurs, 'nothing removed');
    assert.match(rm.leftovers.join('\n'), /line 3: an inline unpack_config list with an entry for "dedup" \(remove that entry by hand\)/);
    assert.match(rm.leftovers.join('\n'), /line 8: dedup = \{.*inline proxy plugin table/);
  });

  test("containerd --version's forms; the platform from process.arch", () => {
    assert.deepEqual(parseContainerdVersion('containerd github.com/containerd/containerd/v2 v2.1.9 d3f1a2b\n'), { version: '2.1.9', major: 2, minor: 1 });
    assert.deepEqual(parseContainerdVersion('containerd github.com/containerd/containerd/v2 2.1.9+unknown \n'), { version: '2.1.9', major: 2, minor: 1 });
    assert.deepEqual(parseContainerdVersion('containerd containerd.io 1.6.20 2806fc1\n'), { version: '1.6.20', major: 1, minor: 6 });
    assert.deepEqual(parseContainerdVersion('containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6\n'), { version: '1.7.24', major: 1, minor: 7 });
    assert.deepEqual(parseContainerdVersion('containerd 2'), { version: '2', major: 2, minor: null });
    assert.deepEqual([hasProxyDiffers(1, 6), hasProxyDiffers(1, 7), hasProxyDiffers(2, null), hasProxyDiffers(1, null), hasProxyDiffers(null, null)], [false, true, true, null, null]);
    assert.equal(parseContainerdVersion('containerd: command not found'), null);
    assert.equal(platformOf('x64'), 'linux/amd64');
    assert.equal(platformOf('arm64'), 'linux/arm64');
  });
});

describe('containerd-config add|remove FILE (the command)', () => {
  test('a new file for containerd 2.x is version 3; a second add changes nothing and says so; remove leaves what was there before add', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ccfg-'));
    try {
      const file = path.join(dir, 'config.toml');
      const out = async (args: string[]) => {
        const chunks: string[] = [];
        const write = process.stdout.write;
        process.stdout.write = ((s: string) => chunks.push(String(s)) > 0) as typeof process.stdout.write;
        try {
          return { code: await runContainerdConfig(args), text: chunks.join('') };
        } finally {
          process.stdout.write = write;
        }
      };
      const first = await out(['add', file, '--containerd-version', 'containerd github.com/containerd/containerd/v2 v2.1.9 abc']);
      assert.equal(first.code, 0);
      assert.match(first.text, /^wrote .*config\.toml \(version 3\) with the transfer service's unpack_config entries for "dedup" and "overlayfs"/);
      const written = fs.readFileSync(file, 'utf8');
      assert.match(written, /^version = 3\n/);
      const second = await out(['add', file, '--containerd-version', '2']);
      assert.match(second.text, /nothing to add to .*: unchanged/);
      assert.equal(fs.readFileSync(file, 'utf8'), written);
      assert.deepEqual(fs.readdirSync(dir), ['config.toml'], 'no backup when nothing changed');
      const rm = await out(['remove', file]);
      assert.match(rm.text, /removed the snapshotter's tables/);
      assert.equal(fs.readFileSync(file, 'utf8'), 'version = 3\n');
      assert.equal(fs.readdirSync(dir).filter((n) => n.startsWith('config.toml.bak-dedup-')).length, 1);
      assert.equal((await out(['add', file, '--containerd-version', 'x.y'])).code, 2);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("install.sh's containerd version (scripts/lib.sh containerd_major)", () => {
  test("the major version of what $CONTAINERD_BIN --version prints; none when it prints no version or is missing", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ccver-'));
    const lib = path.resolve(__dirname, '..', '..', 'scripts', 'lib.sh');
    try {
      const major = (printed: string | null) => {
        const bin = path.join(dir, 'containerd');
        fs.rmSync(bin, { force: true });
        if (printed !== null) fs.writeFileSync(bin, `#!/bin/sh\nprintf '%s\\n' ${JSON.stringify(printed)}\n`, { mode: 0o755 });
        const r = spawnSync('bash', ['-c', '. "$1" && containerd_major', 'lib', lib], { env: { PATH: process.env.PATH, CONTAINERD_BIN: bin }, encoding: 'utf8' });
        return r.status === 0 ? r.stdout.trim() : null;
      };
      assert.equal(major('containerd github.com/containerd/containerd/v2 v2.1.9 d3f1a2b'), '2');
      assert.equal(major('containerd github.com/containerd/containerd/v2 2.1.9+unknown '), '2');
      assert.equal(major('containerd containerd.io 1.6.20 2806fc1'), '1');
      assert.equal(major('containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6'), '1');
      assert.equal(major('something else'), null);
      assert.equal(major(null), null);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
