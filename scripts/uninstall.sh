#!/usr/bin/env bash
# Removes dedup-snapshotter from this host: what install.sh put in place,
# and, with --purge, ROOT (every layer and the chunk store).
#
#   sudo ./scripts/uninstall.sh            # keeps ROOT
#   sudo ./scripts/uninstall.sh --purge    # removes ROOT too
#   sudo ./scripts/uninstall.sh --force    # even while containers run on the snapshotter
#
# In order: lists containerd's images on the snapshotter (they need
# pulling again, or another snapshotter, afterwards); takes what install.sh
# added out of containerd's config (the proxy plugin's tables, the transfer
# service's unpack_config entry for dedup, and the overlayfs one install.sh
# wrote when it would be alone; a backup beside it, the rest of the file
# unchanged) and restarts containerd (systemd, or only the one
# serving $CONTAINERD_SOCKET) so it no longer dials the snapshotter; stops
# the daemon (and disables its unit or init script); unmounts everything
# under ROOT; waits for the on-demand holder to exit (it does once nothing
# is mounted), stopping it if it does not; removes /opt/dedup-snapshotter,
# the /usr/local/bin link, /etc/dedup-snapshotter, the unit or init script,
# the log, pid and socket files. Run it again: it finishes what is left.
# The same environment variables as install.sh set the paths.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/lib.sh
. "$HERE/lib.sh"

PURGE=0
FORCE=0
for a in "$@"; do
  case "$a" in
    --purge) PURGE=1 ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument $a (see --help)" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (sudo $0, or as root without sudo)"

# The program, while it is still there (this script may run from a copy of it).
DS=""
for c in "$BIN_LINK" "$PREFIX/bin/dedup-snapshotter"; do
  if [ -x "$c" ]; then DS=$c; break; fi
done
export ROOT ADDRESS="$SOCKET" CONFIG="$CONFIG_DIR/config.json" PID_FILE LOG_FILE CONTAINERD_ADDRESS="$CONTAINERD_SOCKET"
if [ ! -f "$CONFIG" ]; then
  # Removed already (the guide's order): the defaults, with ROOT and ADDRESS from here.
  CONFIG=$(mktemp)
  echo '{}' >"$CONFIG"
  trap 'rm -f "$CONFIG"' EXIT
fi

# Mount points under ROOT, deepest first (field 5 of mountinfo; octal escapes undone).
mounts_under_root() {
  awk -v r="$ROOT/" '{ p = $5; gsub(/\\040/, " ", p); if (index(p, r) == 1) print p }' /proc/self/mountinfo | awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-
}

# Mounts elsewhere that stack on ROOT: containers' root filesystems (overlays with ROOT in their options).
mounts_using_root() {
  awk -v r="$ROOT/" '{ p = $5; if (index(p, r) == 1) next; for (i = 6; i <= NF; i++) if (index($i, r) > 0) { print p; next } }' /proc/self/mountinfo
}

using=$(mounts_using_root || true)
if [ -n "$using" ]; then
  if [ "$FORCE" = 1 ]; then
    say "--force: these containers' root filesystems stack on ROOT and will lose their layers:"
    printf '    %s\n' $using
  else
    printf '%s\n' "containers run on the dedup snapshotter (their root filesystems stack on $ROOT):" $using >&2
    die "stop and remove those containers first (ctr tasks kill/rm, crictl stop/rm), or pass --force"
  fi
fi

# 1. What containerd loses.
if [ -n "$DS" ] && [ -f "$ROOT/metadata.db" ]; then
  if images=$("$DS" images --containerd "$CONTAINERD_SOCKET" 2>/dev/null); then
    if [ -n "$images" ]; then
      say "containerd's images on the dedup snapshotter (containerd keeps their content; run them with another snapshotter, which unpacks them again, or remove them: ctr -n NAMESPACE images rm IMAGE):"
      printf '%s\n' "$images" | sed 's/^/    /'
    else
      say "no containerd image uses the dedup snapshotter"
    fi
  else
    say "containerd does not answer on $CONTAINERD_SOCKET: cannot list which of its images used the dedup snapshotter"
  fi
fi

# 2. containerd forgets the proxy plugin.
if [ -f "$CONTAINERD_CONFIG" ]; then
  if [ -n "$DS" ]; then
    "$DS" containerd-config remove "$CONTAINERD_CONFIG" | sed 's/^/==> /'
  elif grep -qE "proxy_plugins\.[\"']?dedup" "$CONTAINERD_CONFIG"; then
    say "the program is gone: take [proxy_plugins.dedup] (and its exports table, and the unpack_config entry for snapshotter \"dedup\") out of $CONTAINERD_CONFIG by hand, then restart containerd"
  fi
fi
if use_systemd; then
  if systemctl is-active --quiet containerd.service; then
    say "restarting containerd (systemctl restart containerd) so it no longer dials the snapshotter"
    systemctl restart containerd.service
  fi
else
  restart_containerd "so it no longer dials the snapshotter" no no
fi

# 3. The daemon.
if use_systemd && [ -f /etc/systemd/system/dedup-snapshotter.service ]; then
  say "stopping and disabling dedup-snapshotter.service"
  systemctl disable --now dedup-snapshotter.service >/dev/null 2>&1 || true
  rm -f /etc/systemd/system/dedup-snapshotter.service
  systemctl daemon-reload
elif [ -n "$DS" ]; then
  DEDUP_NO_SYSTEMCTL=1 "$DS" stop | sed 's/^/==> /'
fi
if [ -f "$INIT_DIR/dedup-snapshotter" ]; then
  if [ "$INIT_DIR" = /etc/init.d ] && command -v update-rc.d >/dev/null; then update-rc.d -f dedup-snapshotter remove >/dev/null 2>&1 || true; fi
  rm -f "$INIT_DIR/dedup-snapshotter"
  say "removed $INIT_DIR/dedup-snapshotter"
fi

# 4. Mounts under ROOT: layer images (mnt/<id>), anything mounted by hand there.
n=0
while IFS= read -r m; do
  [ -n "$m" ] || continue
  umount "$m" 2>/dev/null || umount -l "$m"
  n=$((n + 1))
done < <(mounts_under_root)
left=$(mounts_under_root || true)
[ -z "$left" ] || die "still mounted under $ROOT: $left"
say "unmounted $n mounts under $ROOT"

# 5. The on-demand holder: told by the daemon's clean stop, it exits once nothing is mounted.
holder_pid() {
  local p
  p=$(cat "$ROOT/ondemand/holder.pid" 2>/dev/null) || return 1
  tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'ondemand-holder' || return 1
  echo "$p"
}
if hp=$(holder_pid); then
  for _ in $(seq 1 60); do kill -0 "$hp" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$hp" 2>/dev/null; then
    say "stopping the on-demand holder (pid $hp)"
    kill -TERM "$hp"
    for _ in $(seq 1 50); do kill -0 "$hp" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$hp" 2>/dev/null && die "the on-demand holder (pid $hp) did not stop"
  else
    say "the on-demand holder (pid $hp) exited by itself"
  fi
fi

# 6. What install.sh put in place.
for f in "$PREFIX" "$PREFIX.new" "$PREFIX.old" "$CONFIG_DIR"; do
  if [ -e "$f" ]; then rm -rf "$f"; say "removed $f"; fi
done
if [ -L "$BIN_LINK" ] || [ -e "$BIN_LINK" ]; then rm -f "$BIN_LINK"; say "removed $BIN_LINK"; fi
for f in "$LOG_FILE" "$PID_FILE" "$CONTAINERD_PID_FILE"; do
  if [ -e "$f" ]; then rm -f "$f"; say "removed $f"; fi
done
if [ -S "$SOCKET" ]; then rm -f "$SOCKET"; say "removed $SOCKET"; fi
# KSM's flag for dedup-runc (the daemon removes it when it stops; a crash may leave it) and its error note.
KSM_FLAG=${DEDUP_KSM_FLAG:-/run/dedup-snapshotter/ksm-containers}
for f in "$KSM_FLAG" "$KSM_FLAG.error"; do
  if [ -e "$f" ]; then rm -f "$f"; say "removed $f"; fi
done
rmdir "$(dirname "$KSM_FLAG")" 2>/dev/null || true

# 7. ROOT.
if [ -e "$ROOT" ]; then
  if [ "$PURGE" = 1 ]; then
    rm -rf "$ROOT"
    say "removed $ROOT"
  else
    say "kept $ROOT ($(du -sh "$ROOT" 2>/dev/null | cut -f1)): every layer and the chunk store; remove it with --purge"
  fi
fi
say "dedup-snapshotter is uninstalled"
