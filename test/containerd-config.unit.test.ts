/**
 * The proxy plugin's table in containerd's config.toml, added and taken out
 * by line (install.sh, uninstall.sh): every other line stays as it was.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { hasProxyPlugin, proxyPluginSection, removeProxyPlugin, runcWrapperSection } from '../src/containerd/config-toml';

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
