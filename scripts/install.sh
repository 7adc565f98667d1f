#!/usr/bin/env bash
# Installs and starts dedup-snapshotter on a Debian 12 host, and points
# containerd at it. Safe to run again (upgrades in place).
#
#   sudo ./scripts/install.sh            # install deps, build, install, start
#   sudo ./scripts/install.sh --no-apt   # skip apt-get (deps already there)
#
# It never overwrites an existing /etc/dedup-snapshotter/config.json, and it
# adds the proxy plugin to /etc/containerd/config.toml only when missing
# (after a dated backup), leaving the rest of that file alone.
set -euo pipefail

PREFIX=${PREFIX:-/opt/dedup-snapshotter}
BIN_LINK=/usr/local/bin/dedup-snapshotter
CONFIG_DIR=/etc/dedup-snapshotter
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
SOCKET=/run/containerd/dedup-snapshotter.sock
LOG_FILE=/var/log/dedup-snapshotter.log
SRC=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# The pid of the containerd process listening on unix socket $1 (the
# socket's inode in /proc/net/unix, then the containerd holding it); fails
# when there is none.
containerd_on_socket() {
  local inode p
  inode=$(awk -v s="$1" '$8 == s && $6 == "01" { print $7; exit }' /proc/net/unix 2>/dev/null)
  [ -n "$inode" ] || return 1
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = containerd ] || continue
    if ls -l "$p/fd" 2>/dev/null | grep -q "socket:\[$inode\]"; then echo "${p#/proc/}"; return 0; fi
  done
  return 1
}

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"

if [ "${1:-}" != "--no-apt" ]; then
  say "installing Debian packages (containerd runc erofs-utils)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq containerd runc erofs-utils >/dev/null
fi
command -v node >/dev/null || die "Node.js 20 is required (node not found)"

say "building in $SRC"
(cd "$SRC" && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)

say "installing to $PREFIX"
rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new"
cp -a "$SRC/package.json" "$SRC/package-lock.json" "$SRC/bin" "$SRC/dist" "$SRC/proto" "$SRC/node_modules" \
  "$SRC/README.md" "$SRC/docs" "$SRC/config" "$SRC/systemd" "$PREFIX.new/"
rm -rf "$PREFIX.old"
if [ -e "$PREFIX" ]; then mv "$PREFIX" "$PREFIX.old"; fi
mv "$PREFIX.new" "$PREFIX"
rm -rf "$PREFIX.old"
ln -sfn "$PREFIX/bin/dedup-snapshotter" "$BIN_LINK"

mkdir -p "$CONFIG_DIR"
if [ -e "$CONFIG_DIR/config.json" ]; then
  say "keeping existing $CONFIG_DIR/config.json"
else
  install -m 0644 "$SRC/config/config.json" "$CONFIG_DIR/config.json"
  say "wrote $CONFIG_DIR/config.json"
fi

mkdir -p "$(dirname "$CONTAINERD_CONFIG")"
if [ ! -e "$CONTAINERD_CONFIG" ]; then
  { echo 'version = 2'; echo; cat "$SRC/config/containerd-proxy-plugin.toml"; } > "$CONTAINERD_CONFIG"
  say "wrote $CONTAINERD_CONFIG"
elif grep -q 'proxy_plugins\.dedup' "$CONTAINERD_CONFIG"; then
  say "$CONTAINERD_CONFIG already has [proxy_plugins.dedup]"
else
  cp -a "$CONTAINERD_CONFIG" "$CONTAINERD_CONFIG.bak-$(date +%Y%m%d%H%M%S)"
  # A dotted table header is valid TOML whether or not [proxy_plugins] exists.
  printf '\n# added by dedup-snapshotter install.sh\n[proxy_plugins.dedup]\n  type = "snapshot"\n  address = "%s"\n' \
    "$SOCKET" >> "$CONTAINERD_CONFIG"
  say "added [proxy_plugins.dedup] to $CONTAINERD_CONFIG (backup beside it)"
fi

wait_socket() {
  for _ in $(seq 1 100); do
    [ -S "$SOCKET" ] && return 0
    sleep 0.1
  done
  return 1
}

if [ -d /run/systemd/system ]; then
  install -m 0644 "$SRC/systemd/dedup-snapshotter.service" /etc/systemd/system/dedup-snapshotter.service
  systemctl daemon-reload
  systemctl enable dedup-snapshotter.service >/dev/null
  systemctl restart dedup-snapshotter.service
  wait_socket || die "dedup-snapshotter did not create $SOCKET; see: journalctl -u dedup-snapshotter -n 50"
  systemctl restart containerd.service
  say "started: systemctl status dedup-snapshotter"
else
  # No systemd (a container or a minimal VM): run both in the background.
  say "systemd is not running; starting the daemon in the background (log: $LOG_FILE)"
  if [ -f /run/dedup-snapshotter.pid ] && kill -0 "$(cat /run/dedup-snapshotter.pid)" 2>/dev/null; then
    kill -TERM "$(cat /run/dedup-snapshotter.pid)"
    for _ in $(seq 1 100); do kill -0 "$(cat /run/dedup-snapshotter.pid)" 2>/dev/null || break; sleep 0.1; done
  fi
  ROOT=/var/lib/containerd/io.containerd.snapshotter.v1.dedup ADDRESS=$SOCKET CONFIG=$CONFIG_DIR/config.json \
    nohup "$BIN_LINK" >>"$LOG_FILE" 2>&1 </dev/null &
  echo $! > /run/dedup-snapshotter.pid
  wait_socket || die "dedup-snapshotter did not create $SOCKET; see $LOG_FILE"
  # Only the containerd serving /run/containerd/containerd.sock is restarted
  # (found by the socket it listens on, never by name: Docker's or k3s's
  # containerd, or a second instance with its own socket, are not touched).
  if pid=$(containerd_on_socket /run/containerd/containerd.sock); then
    say "restarting the containerd serving /run/containerd/containerd.sock (pid $pid) so it loads the proxy plugin"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  nohup containerd --config "$CONTAINERD_CONFIG" >>/var/log/containerd.log 2>&1 </dev/null &
  echo $! > /run/dedup-snapshotter-containerd.pid
  for _ in $(seq 1 100); do ctr version >/dev/null 2>&1 && break; sleep 0.1; done
  say "started dedup-snapshotter (pid $(cat /run/dedup-snapshotter.pid)) and containerd"
fi

if ctr plugins ls 2>/dev/null | grep -E '^io\.containerd\.snapshotter\.v1 +dedup +.* ok' >/dev/null; then
  say "containerd sees the dedup snapshotter: ctr image pull --snapshotter=dedup IMAGE"
else
  die "containerd does not list the dedup snapshotter as ok; check: ctr plugins ls | grep dedup"
fi
