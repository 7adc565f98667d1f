# Shared by install.sh and uninstall.sh (sourced).

# Where everything goes; each can be set from the environment (the tests move them all).
PREFIX=${PREFIX:-/opt/dedup-snapshotter}
BIN_LINK=${BIN_LINK:-/usr/local/bin/dedup-snapshotter}
CONFIG_DIR=${CONFIG_DIR:-/etc/dedup-snapshotter}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
CONTAINERD_SOCKET=${CONTAINERD_SOCKET:-/run/containerd/containerd.sock}
SOCKET=${SOCKET:-/run/containerd/dedup-snapshotter.sock}
ROOT=${ROOT:-/var/lib/containerd/io.containerd.snapshotter.v1.dedup}
PID_FILE=${PID_FILE:-/run/dedup-snapshotter.pid}
LOG_FILE=${LOG_FILE:-/var/log/dedup-snapshotter.log}
CONTAINERD_PID_FILE=${CONTAINERD_PID_FILE:-/run/dedup-snapshotter-containerd.pid}
CONTAINERD_LOG=${CONTAINERD_LOG:-/var/log/containerd.log}
# The containerd binary started without systemd, and asked for its version.
CONTAINERD_BIN=${CONTAINERD_BIN:-containerd}
INIT_DIR=${INIT_DIR:-/etc/init.d}
INSTALL_INIT=${INSTALL_INIT:-auto}
USE_SYSTEMD=${USE_SYSTEMD:-auto}

say() { printf '==> %s\n' "$*"; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# Whether systemd runs this host (and USE_SYSTEMD does not say no).
use_systemd() {
  [ "${USE_SYSTEMD:-auto}" != no ] && [ -d /run/systemd/system ]
}

wait_socket() {
  for _ in $(seq 1 100); do
    [ -S "$1" ] && return 0
    sleep 0.1
  done
  return 1
}

# containerd's major version (1, 2, …) from $CONTAINERD_BIN --version
# ("containerd github.com/containerd/containerd/v2 v2.1.9 …", "containerd
# containerd.io 1.6.20 …": the first word after the name that is a version);
# fails when it cannot tell.
containerd_major() {
  local out
  out=$("$CONTAINERD_BIN" --version 2>/dev/null) || return 1
  printf '%s\n' "$out" | head -n1 | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^v?[0-9]+(\.[0-9]+)+/) { v = $i; sub(/^v/, "", v); split(v, p, "."); print p[1]; exit 0 } exit 1 }'
}

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

# Restarts the containerd serving $CONTAINERD_SOCKET, or the one install.sh
# started ($CONTAINERD_PID_FILE), with --config $CONTAINERD_CONFIG. $1: why
# (for the message); $2: yes to start one when none runs; $3: yes to record
# its pid in $CONTAINERD_PID_FILE (install.sh), no to drop that file (uninstall.sh).
restart_containerd() {
  local why=$1 start_if_none=$2 record=$3 pid="" how="" p
  if pid=$(containerd_on_socket "$CONTAINERD_SOCKET"); then
    how="serving $CONTAINERD_SOCKET"
  elif [ -f "$CONTAINERD_PID_FILE" ] && p=$(cat "$CONTAINERD_PID_FILE") && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = containerd ]; then
    pid=$p
    how="install.sh started"
  else
    pid=""
  fi
  if [ -n "$pid" ]; then
    say "restarting the containerd $how (pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline")) $why"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && die "containerd (pid $pid) did not stop within 10 s"
  elif [ "$start_if_none" != yes ]; then
    say "no containerd serves $CONTAINERD_SOCKET: none restarted"
    [ "$record" = yes ] || rm -f "$CONTAINERD_PID_FILE"
    return 0
  fi
  mkdir -p "$(dirname "$CONTAINERD_LOG")"
  # nohup execs containerd: $! is containerd's own pid.
  nohup "$CONTAINERD_BIN" --config "$CONTAINERD_CONFIG" >>"$CONTAINERD_LOG" 2>&1 </dev/null &
  local started=$!
  if [ "$record" = yes ]; then
    mkdir -p "$(dirname "$CONTAINERD_PID_FILE")"
    echo "$started" >"$CONTAINERD_PID_FILE"
  else
    rm -f "$CONTAINERD_PID_FILE"
  fi
  for _ in $(seq 1 100); do ctr --address "$CONTAINERD_SOCKET" version >/dev/null 2>&1 && break; sleep 0.1; done
  ctr --address "$CONTAINERD_SOCKET" version >/dev/null 2>&1 || die "containerd (pid $started) does not answer on $CONTAINERD_SOCKET; see $CONTAINERD_LOG"
  say "started containerd (pid $started) with --config $CONTAINERD_CONFIG; log: $CONTAINERD_LOG"
}

# Without systemd: an LSB init script so the daemon starts at boot, where
# sysvinit runs (INSTALL_INIT=yes writes it anyway, =no never).
install_init_script() {
  local pid1 script="$INIT_DIR/dedup-snapshotter"
  pid1=$(cat /proc/1/comm 2>/dev/null || echo '?')
  case "${INSTALL_INIT:-auto}" in
    no) return 0 ;;
    auto)
      if [ "$pid1" != init ] || ! command -v update-rc.d >/dev/null; then
        say "no init system to start it at boot (PID 1 is $pid1): run '$BIN_LINK start' from this host's boot scripts, with ROOT=$ROOT ADDRESS=$SOCKET CONFIG=$CONFIG_DIR/config.json"
        return 0
      fi
      ;;
  esac
  mkdir -p "$INIT_DIR"
  {
    cat <<'EOF'
#!/bin/sh
### BEGIN INIT INFO
# Provides:          dedup-snapshotter
# Required-Start:    $local_fs $remote_fs
# Required-Stop:     $local_fs $remote_fs
# X-Start-Before:    containerd
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: containerd proxy snapshotter (EROFS layers, node-wide block dedup)
### END INIT INFO
# Written by dedup-snapshotter's install.sh; uninstall.sh removes it.
EOF
    printf 'ROOT=%q ADDRESS=%q CONFIG=%q PID_FILE=%q LOG_FILE=%q\n' "$ROOT" "$SOCKET" "$CONFIG_DIR/config.json" "$PID_FILE" "$LOG_FILE"
    echo 'export ROOT ADDRESS CONFIG PID_FILE LOG_FILE'
    printf 'DS=%q\n' "$BIN_LINK"
    cat <<'EOF'
case "$1" in
  start | stop | restart | reload | status) exec "$DS" "$1" ;;
  force-reload) exec "$DS" reload ;;
  *) echo "usage: $0 start|stop|restart|reload|force-reload|status" >&2; exit 3 ;;
esac
EOF
  } >"$script.new"
  chmod 0755 "$script.new"
  mv "$script.new" "$script"
  if [ "$pid1" = init ] && command -v update-rc.d >/dev/null && [ "$INIT_DIR" = /etc/init.d ]; then
    update-rc.d dedup-snapshotter defaults >/dev/null
    say "installed $script (started at boot: update-rc.d dedup-snapshotter defaults)"
  else
    say "wrote $script (start|stop|restart|reload|status)"
  fi
}
