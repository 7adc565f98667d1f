/**
 * The proxy plugin's table in containerd's config.toml, added and taken out
 * by line (install.sh, uninstall.sh): every other line stays as it was.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { hasProxyPlugin, proxyPluginSection, removeProxyPlugin } from '../src/containerd/config-toml';

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
    const r = removeProxyPlugin(text);
    assert.equal(r.text, text, 'nothing removed');
    assert.equal(r.leftovers.length, 2);
    assert.match(r.leftovers[0], /^line 3: snapshotter = "dedup" \(CRI uses the dedup snapshotter/);
    assert.match(r.leftovers[1], /^line 5: dedup = \{.*inline proxy plugin table/);
  });

  test('a file without the table is left alone', () => {
    const r = removeProxyPlugin(OTHER);
    assert.equal(r.text, OTHER);
    assert.deepEqual(r.removed, []);
  });
});
