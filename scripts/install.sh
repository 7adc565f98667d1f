#!/usr/bin/env bash
# Installs and starts dedup-snapshotter on a Debian 12 host, and points
# containerd at it. Safe to run again (upgrades in place).
#
#   sudo ./scripts/install.sh              # install missing deps, build, install, start
#   sudo ./scripts/install.sh --no-apt     # skip apt-get (deps already there)
#   sudo ./scripts/install.sh --no-build   # install the tree as built (npm ci && npm run build done)
#   sudo ./scripts/install.sh --diff-service   # also: containerd's diff service asks the daemon
#        first (1.7: pulls unpack dedup's layers in one pass); while the daemon is
#        stopped every pull through the diff service fails (docs/configuration.md)
#
# It touches only what it owns: /opt/dedup-snapshotter, the link
# /usr/local/bin/dedup-snapshotter, /etc/dedup-snapshotter (an existing
# config.json is kept), the proxy plugin's table in containerd's config
# (added when missing, after a backup, the rest of that file left alone),
# and its unit (systemd) or its init script. It restarts containerd through
# systemd where systemd runs; otherwise only the containerd serving
# $CONTAINERD_SOCKET (found by the socket it listens on, never by name), or
# the one it started itself, and it says what it did.
#
# containerd's config is written for the containerd it restarts
# (CONTAINERD_BIN, default containerd in PATH; its --version): for 2.x also
# the transfer service's unpack_config entries, and a missing file is a
# version 3 one.
#
# Every path can be set from the environment (the tests install into a
# temp dir): PREFIX BIN_LINK CONFIG_DIR CONTAINERD_CONFIG CONTAINERD_SOCKET
# CONTAINERD_BIN SOCKET ROOT PID_FILE LOG_FILE CONTAINERD_PID_FILE
# CONTAINERD_LOG INIT_DIR; INSTALL_INIT=auto|yes|no (an init script for
# boot), USE_SYSTEMD=auto|no.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$SRC/scripts/lib.sh"

APT=1
BUILD=1
DIFF_SERVICE=0
for a in "$@"; do
  case "$a" in
    --no-apt) APT=0 ;;
    --no-build) BUILD=0 ;;
    --diff-service) DIFF_SERVICE=1 ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) die "unknown argument $a (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root (sudo $0, or as root without sudo)"

if [ "$APT" = 1 ]; then
  # Only what is missing: a containerd or runc already here (containerd 2.x
  # from its release tarball, Docker's containerd.io, which conflicts with
  # Debian's containerd package) is the one to use, never replaced.
  pkgs=()
  command -v "$CONTAINERD_BIN" >/dev/null || pkgs+=(containerd)
  command -v runc >/dev/null || pkgs+=(runc)
  command -v mkfs.erofs >/dev/null || pkgs+=(erofs-utils)
  # zstd-compressed layers are decompressed by the zstd program (dedup-differ).
  command -v zstd >/dev/null || pkgs+=(zstd)
  if [ "${#pkgs[@]}" -gt 0 ]; then
    say "installing Debian packages (${pkgs[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${pkgs[@]}" >/dev/null
  else
    say "containerd, runc and mkfs.erofs are here: no Debian package to install"
  fi
fi
command -v node >/dev/null || die "Node.js 20 is required (node not found)"

if [ "$BUILD" = 1 ]; then
  say "building in $SRC (npm ci && npm run build)"
  (cd "$SRC" && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
fi
[ -f "$SRC/dist/src/cmd/main.js" ] || die "$SRC is not built: run npm ci && npm run build, or drop --no-build"

say "installing to $PREFIX"
rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new"
cp -a "$SRC/package.json" "$SRC/package-lock.json" "$SRC/bin" "$SRC/dist" "$SRC/proto" "$SRC/node_modules" \
  "$SRC/README.md" "$SRC/docs" "$SRC/config" "$SRC/systemd" "$SRC/scripts" "$PREFIX.new/"
rm -rf "$PREFIX.old"
if [ -e "$PREFIX" ]; then mv "$PREFIX" "$PREFIX.old"; fi
mv "$PREFIX.new" "$PREFIX"
rm -rf "$PREFIX.old"
mkdir -p "$(dirname "$BIN_LINK")"
ln -sfn "$PREFIX/bin/dedup-snapshotter" "$BIN_LINK"
DS=$BIN_LINK

mkdir -p "$CONFIG_DIR"
if [ -e "$CONFIG_DIR/config.json" ]; then
  say "keeping existing $CONFIG_DIR/config.json"
else
  install -m 0644 "$SRC/config/config.json" "$CONFIG_DIR/config.json"
  say "wrote $CONFIG_DIR/config.json"
fi

# KSM for containers: runc through bin/dedup-runc (a perl script); compiled
# from native/dedup-runc.c where a C compiler is at hand (1-2 ms per runc
# call instead of 4-5), the script kept otherwise.
if command -v cc >/dev/null 2>&1 && cc -O2 -Wall -o "$PREFIX/bin/dedup-runc.new" "$SRC/native/dedup-runc.c" 2>/dev/null; then
  mv "$PREFIX/bin/dedup-runc.new" "$PREFIX/bin/dedup-runc"
  say "compiled $PREFIX/bin/dedup-runc (runc's wrapper for KSM) from native/dedup-runc.c"
else
  rm -f "$PREFIX/bin/dedup-runc.new"
fi

# The proxy plugin's table (with its exports), for containerd 2.x the
# transfer service's unpack_config entries, and CRI's runc runtime through
# the wrapper where the file has no runc table of its own, added by line
# (containerd-config: a backup first, the rest of the file unchanged).
version_args=()
if major=$(containerd_major); then
  version_line=$("$CONTAINERD_BIN" --version 2>/dev/null | head -n1)
  say "containerd $major.x ($CONTAINERD_BIN --version: $version_line)"
  version_args=(--containerd-version "$version_line")
else
  say "cannot tell containerd's version ($CONTAINERD_BIN --version gave none): $CONTAINERD_CONFIG is written by its own version = line (version 2 when new)"
fi
[ "$DIFF_SERVICE" = 1 ] && version_args+=(--diff-service)
"$DS" containerd-config add "$CONTAINERD_CONFIG" --address "$SOCKET" --runc-wrapper "$PREFIX/bin/dedup-runc" "${version_args[@]}" | sed 's/^/==> /'

# The daemon's environment, as the unit sets it.
export ROOT ADDRESS="$SOCKET" CONFIG="$CONFIG_DIR/config.json" PID_FILE LOG_FILE CONTAINERD_ADDRESS="$CONTAINERD_SOCKET"

if use_systemd; then
  install -m 0644 "$SRC/systemd/dedup-snapshotter.service" /etc/systemd/system/dedup-snapshotter.service
  systemctl daemon-reload
  systemctl enable dedup-snapshotter.service >/dev/null
  systemctl restart dedup-snapshotter.service
  wait_socket "$SOCKET" || die "dedup-snapshotter did not create $SOCKET; see: journalctl -u dedup-snapshotter -n 50"
  say "restarting containerd (systemctl restart containerd) so it loads the proxy plugin"
  systemctl restart containerd.service
  say "started: systemctl status dedup-snapshotter; logs: journalctl -u dedup-snapshotter"
else
  say "systemd is not running here: the daemon runs in the background (dedup-snapshotter start|stop|restart|reload|status; pid $PID_FILE, log $LOG_FILE)"
  "$DS" restart | sed 's/^/==> /'
  install_init_script
  # containerd: only the one serving $CONTAINERD_SOCKET (by the socket, not
  # by name: Docker's or k3s's containerd, or another instance with its own
  # socket, are not touched), or the one this script started before.
  restart_containerd "so it loads the proxy plugin" yes yes
fi

if ctr --address "$CONTAINERD_SOCKET" plugins ls 2>/dev/null | grep -E '^io\.containerd\.snapshotter\.v1 +dedup +.* ok' >/dev/null; then
  say "containerd sees the dedup snapshotter: ctr image pull --snapshotter=dedup IMAGE"
else
  die "containerd does not list the dedup snapshotter as ok; check: ctr --address $CONTAINERD_SOCKET plugins ls | grep dedup"
fi
