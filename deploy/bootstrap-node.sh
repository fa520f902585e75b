#!/usr/bin/env bash
# Prepares a Linux host that is (or will be) a Docker Swarm node to run the mesh agent:
# checks the kernel, makes sure Docker is there, mounts bpffs, sets the sysctls, opens
# the swarm's ports in an active host firewall, installs the release build and writes
# the agent's settings file. Idempotent: a second run with the same flags changes
# nothing. Every line it prints starts with `ok:` (already fine), `changed:` (done now),
# `would:` (--dry-run), `note:` or `next:`; a failure is one line on stderr starting
# `bootstrap-node: error:`. Run with --help for the flags.

set -Eeuo pipefail
umask 022
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

PROG=bootstrap-node
ARGS=("$@")
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

# The sysctls the mesh needs: "key=value|why". Add a line to add one.
SYSCTLS=(
  "net.ipv4.ip_forward=1|the mesh forwards between the underlay and the tasks' veths, as Docker does"
)
BPFFS=/sys/fs/bpf
FSTAB_LINE="bpffs $BPFFS bpf defaults 0 0"
RULE_TAG=mesh-bootstrap

usage() {
  cat <<EOF
usage: bootstrap-node.sh [options]

Prepares this host (a Docker Swarm node, or one about to become one) to run the mesh
agent. Run as root. Idempotent; every change is printed (changed: ...).

  --dry-run             print each change it would make (would: ...) and make none;
                        the checks still run and still fail
  --data-path-port N    the swarm's VXLAN data-path port (default 4789, or the value
                        already in the settings file); opened in the firewall and
                        written to the agent settings as data-path-port
  --peer-port N         the agents' health exchange over TCP between nodes (default
                        9478, or the settings file's; 0 = off); opened and written too
  --root DIR            prefix for every file written (/etc/fstab, /etc/sysctl.d,
                        /etc/mesh/agent.yaml, the binaries); default /. Live changes
                        (bpffs mount, sysctl -w, firewall) still apply to this system
  --from DIR            the release build: mesh-agent, meshctl, mesh.bpf.o
                        (default: <repo>/target/release, next to this script's deploy/)
  --prefix DIR          install prefix (default /usr/local): DIR/bin/{mesh-agent,meshctl},
                        DIR/lib/mesh/mesh.bpf.o
  --no-docker-install   fail instead of installing Docker when it is absent
  --keep-ipvs-off       keep the ip_vs module from loading (/etc/modprobe.d/
                        mesh-no-ipvs.conf), so Docker's own IPVS mesh stays off and the
                        mesh alone serves published ports and VIPs; takes full effect at
                        the next boot if ip_vs is loaded now. Undo: --allow-ipvs
  --allow-ipvs          remove that file again (ip_vs loads when Docker asks for it)
  -h, --help            this text

Steps: root check; kernel checks (>= 5.10, with what 5.10..6.5 fall back to noted; bpf
syscall, BTF, tc clsact, VXLAN; cgroup v2 noted); Docker; bpffs at $BPFFS (mounted, and in /etc/fstab); sysctls
(/etc/sysctl.d/90-mesh.conf and live); firewall (ufw, firewalld, or iptables/nft when
input is filtered): 2377/tcp, 7946/tcp, 7946/udp, the data-path port/udp, the peer
port/tcp; install the binaries; /etc/mesh/agent.yaml; /run/mesh; whether Docker's IPVS
mesh can run here (and, with --keep-ipvs-off, keeping it off).
EOF
}

# --- output and failure ---------------------------------------------------------------

# The message as one line.
oneline() {
  local s="$*"
  s=${s//$'\r'/}
  s=${s//$'\n'/; }
  printf '%s' "$s"
}

die() {
  printf '%s: error: %s\n' "$PROG" "$(oneline "$*")" >&2
  exit 1
}

# An unexpected failure (set -e) as one line naming the command. In a subshell (a command
# substitution) it reports and exits with SUBSHELL_RC, which the parent's trap then
# passes on silently, so there is still one line.
SUBSHELL_RC=197
on_err() {
  local rc=$1 cmd=$2 line=$3
  if [[ $BASHPID != "$$" ]]; then
    if ((rc != SUBSHELL_RC)); then
      printf "%s: error: unexpected failure of \`%s\` (exit %s, line %s of %s); fix that and rerun (it is idempotent)\n" \
        "$PROG" "$(oneline "$cmd")" "$rc" "$line" "${BASH_SOURCE[0]}" >&2
    fi
    exit "$SUBSHELL_RC"
  fi
  ((rc == SUBSHELL_RC)) && exit 1
  printf "%s: error: unexpected failure of \`%s\` (exit %s, line %s of %s); fix that and rerun (it is idempotent)\n" \
    "$PROG" "$(oneline "$cmd")" "$rc" "$line" "${BASH_SOURCE[0]}" >&2
  exit 1
}
trap 'on_err "$?" "$BASH_COMMAND" "$LINENO"' ERR

# A temporary file being written; removed if the script stops before renaming it.
TMPFILE=""
on_exit() {
  if [[ -n $TMPFILE ]]; then rm -f -- "$TMPFILE"; fi
}
trap on_exit EXIT

# have CMD: an executable CMD on PATH (bash's `command -v` alone also names a
# non-executable file).
have() {
  local p
  p=$(command -v "$1" 2>/dev/null || true)
  [[ -n $p && -x $p ]]
}

CHANGES=0
ok() { printf 'ok: %s\n' "$*"; }
note() { printf 'note: %s\n' "$*"; }

# change DESCRIPTION CMD [ARGS...]: prints `would: DESCRIPTION` under --dry-run, else
# runs the command (which fails with one line itself) and prints `changed: DESCRIPTION`.
change() {
  local what=$1
  shift
  CHANGES=$((CHANGES + 1))
  if ((DRY_RUN)); then
    printf 'would: %s\n' "$what"
    return 0
  fi
  "$@"
  printf 'changed: %s\n' "$what"
}

# run CMD [ARGS...]: runs an external command; on failure, one error line with its output.
run() {
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  if ((rc != 0)); then
    die "\`$*\` failed (exit $rc): ${out:-no output}"
  fi
}

# --- files (all under $R) ---------------------------------------------------------------

# Mode as stat prints it (e.g. 755), or empty.
mode_of() { stat -c %a -- "$1" 2>/dev/null || true; }

make_dir() {
  [[ -d $1 ]] || run mkdir -p -- "$1"
}

# write_file PATH MODE CONTENT: atomically (a temporary file in the same directory, then
# a rename), so a running reader never sees half a file.
write_file() {
  local path=$1 mode=$2 content=$3 dir tmp
  dir=$(dirname -- "$path")
  make_dir "$dir"
  tmp="$dir/.${path##*/}.$PROG.$$"
  TMPFILE=$tmp
  { printf '%s' "$content" >"$tmp"; } 2>/dev/null || die "cannot write $tmp (read-only or full file system?)"
  run chmod "$mode" "$tmp"
  run mv -fT -- "$tmp" "$path"
  TMPFILE=""
}

# copy_file SRC DST MODE: as write_file, for a file's bytes (a binary in use stays
# usable: the old inode lives on until its users are gone).
copy_file() {
  local src=$1 dst=$2 mode=$3 dir tmp
  dir=$(dirname -- "$dst")
  make_dir "$dir"
  tmp="$dir/.${dst##*/}.$PROG.$$"
  TMPFILE=$tmp
  run cp -- "$src" "$tmp"
  run chmod "$mode" "$tmp"
  run mv -fT -- "$tmp" "$dst"
  TMPFILE=""
}

# ensure_file PATH MODE CONTENT WHAT: the file holds exactly CONTENT with MODE.
ensure_file() {
  local path=$1 mode=$2 content=$3 what=$4
  if [[ -f $path ]] && cmp -s -- "$path" <(printf '%s' "$content"); then
    if [[ $(mode_of "$path") == "${mode#0}" ]]; then
      ok "$path: $what up to date"
    else
      change "chmod $mode $path" run chmod "$mode" "$path"
    fi
  else
    local verb=write
    [[ -e $path ]] && verb=update
    change "$verb $path ($what)" write_file "$path" "$mode" "$content"
  fi
}

append_line() {
  local path=$1 line=$2 content=""
  if [[ -f $path ]]; then
    content=$(cat -- "$path"; printf x) || die "cannot read $path"
    content=${content%x}
    [[ -z $content || $content == *$'\n' ]] || content+=$'\n'
  fi
  local mode=644
  [[ -f $path ]] && mode=$(mode_of "$path")
  write_file "$path" "$mode" "$content$line"$'\n'
}

# --- arguments ---------------------------------------------------------------------------

# valid_port VALUE MIN: whether VALUE is a port number in MIN..65535.
valid_port() {
  local v=$1 min=$2
  [[ $v =~ ^[0-9]{1,5}$ ]] && ((10#$v >= min && 10#$v <= 65535))
}

DRY_RUN=0
DATA_PATH_PORT=""
PEER_PORT=""
ROOT=/
FROM=""
PREFIX=/usr/local
DOCKER_INSTALL=1
IPVS=""
IPVS_FLAGS=0

need_value() {
  (($# >= 2)) || die "$1 needs a value (see --help)"
}

while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --no-docker-install) DOCKER_INSTALL=0 ;;
    --keep-ipvs-off) IPVS=off ;;
    --allow-ipvs) IPVS=allow ;;
    -h | --help)
      usage
      exit 0
      ;;
    --data-path-port | --peer-port | --root | --from | --prefix)
      need_value "$@"
      opt=$1
      val=$2
      shift
      ;&
    --data-path-port=* | --peer-port=* | --root=* | --from=* | --prefix=*)
      if [[ $1 == *=* ]]; then
        opt=${1%%=*}
        val=${1#*=}
      fi
      case $opt in
        --data-path-port)
          valid_port "$val" 1 || die "--data-path-port must be a port number 1..65535, not \`$val\`"
          DATA_PATH_PORT=$((10#$val))
          ;;
        --peer-port)
          valid_port "$val" 0 || die "--peer-port must be a port number 0..65535 (0 = off), not \`$val\`"
          PEER_PORT=$((10#$val))
          ;;
        --root) ROOT=$val ;;
        --from) FROM=$val ;;
        --prefix) PREFIX=$val ;;
      esac
      ;;
    *) die "unknown argument \`$1\` (see --help)" ;;
  esac
  [[ $1 == --keep-ipvs-off || $1 == --allow-ipvs ]] && IPVS_FLAGS=$((IPVS_FLAGS + 1))
  shift
done
((IPVS_FLAGS <= 1)) || die "--keep-ipvs-off and --allow-ipvs contradict each other: pass one"

[[ $ROOT == /* ]] || die "--root must be an absolute path, not \`$ROOT\`"
[[ -d $ROOT ]] || die "--root $ROOT is not a directory (create it first)"
[[ $PREFIX == /* ]] || die "--prefix must be an absolute path, not \`$PREFIX\`"
R=$ROOT
while [[ $R == */ ]]; do R=${R%/}; done
while [[ $PREFIX == */ && $PREFIX != / ]]; do PREFIX=${PREFIX%/}; done
[[ $PREFIX == / ]] && PREFIX=""

if [[ -z $FROM ]]; then
  FROM="$(cd -- "$SCRIPT_DIR/.." && pwd)/target/release"
fi
[[ -d $FROM ]] || die "--from $FROM is not a directory: run \`cargo xtask build\` first (or pass --from DIR holding the release build)"
ARTIFACTS=(mesh-agent meshctl mesh.bpf.o)
missing=()
for f in "${ARTIFACTS[@]}"; do
  [[ -f $FROM/$f ]] || missing+=("$f")
done
if ((${#missing[@]})); then
  missing_list=$(printf '%s, ' "${missing[@]}")
  die "--from $FROM lacks ${missing_list%, }: run \`cargo xtask build\` first (or pass --from DIR holding the release build)"
fi

SETTINGS="$R/etc/mesh/agent.yaml"

# settings_value KEY: the key's value in the existing settings file, or empty.
settings_value() {
  [[ -f $SETTINGS ]] || return 0
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    if line_value "$1" "$line"; then
      return 0
    fi
  done <"$SETTINGS"
}

# line_value KEY LINE: prints the value when LINE is `KEY: value` (quotes and a trailing
# comment allowed), else fails.
line_value() {
  local re="^$1:[[:space:]]*[\"']?([^\"'#[:space:]]*)[\"']?[[:space:]]*(#.*)?$"
  [[ $2 =~ $re ]] || return 1
  printf '%s' "${BASH_REMATCH[1]}"
}

# A port flag not given keeps the settings file's value (so a rerun without flags does
# not undo an earlier --data-path-port), else the agent's default.
port_default() {
  local key=$1 min=$2 dflt=$3 v
  v=$(settings_value "$key")
  if [[ -n $v ]] && valid_port "$v" "$min"; then
    printf '%s' "$((10#$v))"
  else
    printf '%s' "$dflt"
  fi
}
[[ -n $DATA_PATH_PORT ]] || DATA_PATH_PORT=$(port_default data-path-port 1 4789)
[[ -n $PEER_PORT ]] || PEER_PORT=$(port_default peer-port 0 9478)

# --- 1. root ---------------------------------------------------------------------------------

step_root() {
  ((EUID == 0)) || die "must run as root (try: sudo $0${ARGS[*]:+ ${ARGS[*]}})"
  ((DRY_RUN)) && note "dry run: nothing is changed; the would: lines are what a real run would do"
  if [[ -n $R ]]; then
    note "files go under --root $ROOT; live changes (bpffs mount, sysctl -w, firewall) apply to this running system"
  fi
  return 0
}

# --- 2. kernel ---------------------------------------------------------------------------------

KREL=$(uname -r)
KCONFIG_SRC=""
KCONFIG=""

# Sets KCONFIG_SRC and KCONFIG (the lines that matter) when a kernel config is readable.
load_kconfig() {
  local want='^CONFIG_(BPF_SYSCALL|NET_SCH_INGRESS|VXLAN|DEBUG_INFO_BTF)=' text=""
  if [[ -r /boot/config-$KREL ]]; then
    KCONFIG_SRC=/boot/config-$KREL
    text=$(grep -E '^(# )?CONFIG_' "/boot/config-$KREL" 2>/dev/null || true)
  fi
  if [[ -z $text && -r /proc/config.gz ]] && have zcat; then
    KCONFIG_SRC=/proc/config.gz
    text=$(zcat /proc/config.gz 2>/dev/null || true)
  fi
  if [[ $text == *CONFIG_* ]]; then
    KCONFIG=$(grep -E "$want" <<<"$text" || true)
  else
    KCONFIG_SRC=""
  fi
}

# kconfig NAME: y, m or empty (not set, or no config readable).
kconfig() {
  local line
  while IFS= read -r line; do
    if [[ $line == "$1="* ]]; then
      printf '%s' "${line#*=}"
      return 0
    fi
  done <<<"$KCONFIG"
}

# module_status NAME: loaded, builtin, module, absent (a module tree here that lacks it)
# or unknown (no module tree: a container, say).
module_status() {
  local mod=$1 dir=/lib/modules/$KREL
  if [[ -d /sys/module/$mod ]]; then
    echo loaded
  elif [[ -r $dir/modules.builtin ]] && grep -q "/$mod\.ko\$" "$dir/modules.builtin"; then
    echo builtin
  elif have modinfo && modinfo -n "$mod" >/dev/null 2>&1; then
    echo module
  elif [[ -d $dir ]]; then
    echo absent
  else
    echo unknown
  fi
}

MISSING=()

# check_tristate LABEL CONFIG_NAME MODULE
check_tristate() {
  local label=$1 opt=$2 mod=$3 v st
  st=$(module_status "$mod")
  if [[ -n $KCONFIG_SRC ]]; then
    v=$(kconfig "$opt")
    case $v in
      y) ok "$label ($opt=y)" ;;
      m)
        case $st in
          loaded | builtin | module) ok "$label ($opt=m, module $mod $st)" ;;
          absent) MISSING+=("$label ($opt=m but module $mod is not in /lib/modules/$KREL)") ;;
          *) note "cannot tell whether $label is available ($opt=m, and no /lib/modules/$KREL here)" ;;
        esac
        ;;
      *) MISSING+=("$label ($opt is not set in $KCONFIG_SRC)") ;;
    esac
  else
    case $st in
      loaded | builtin | module) ok "$label (module $mod $st)" ;;
      absent) MISSING+=("$label (module $mod neither built in nor in /lib/modules/$KREL)") ;;
      *) note "cannot tell whether $label is available (no kernel config readable, no /lib/modules/$KREL)" ;;
    esac
  fi
}

# The agent's rules (mesh-agent/src/host/preflight.rs and datapath/features/): below 5.10 it refuses,
# naming what is missing; from 5.10 on, what a release lacks has a fallback, which the
# agent picks by probing the kernel at load time (so a backport is used where present).
check_kernel_version() {
  if [[ ! $KREL =~ ^([0-9]+)\.([0-9]+) ]]; then
    note "cannot tell the kernel version from \`$KREL\`; the agent needs >= 5.10 and probes the rest"
    return 0
  fi
  local v=$((BASH_REMATCH[1] * 1000 + BASH_REMATCH[2])) lacks=() list="" m
  if ((v < 5010)); then
    ((v < 5007)) && lacks+=("cgroup bpf links and BPF_LINK_UPDATE (5.7)" "bpf_get_netns_cookie in socket programs (5.7)")
    ((v < 5008)) && lacks+=("getpeername socket hooks (5.8)")
    ((v < 5009)) && lacks+=("XDP bpf links (5.9)")
    lacks+=("bpf_redirect_neigh (5.10)")
    for m in "${lacks[@]}"; do list+="${list:+, }$m"; done
    MISSING+=("kernel >= 5.10 (this is $KREL, which lacks $list)")
    return 0
  fi
  if ((v >= 6006)); then
    ok "kernel $KREL (>= 6.6: tcx links and every helper the datapath uses)"
    return 0
  fi
  ok "kernel $KREL (>= 5.10)"
  note "kernel $KREL: no tcx links before 6.6: the agent attaches TC programs as netlink clsact filters instead (a restarted agent replaces them in place)"
  ((v < 5012)) && note "kernel $KREL: no bpf_check_mtu before 5.12: the datapath checks the underlay's MTU itself"
  ((v < 5014)) && note "kernel $KREL: no SO_NETNS_COOKIE before 5.14: the host port stays off (published ports answer from other hosts, not from this node or its containers)"
  ((v < 5018)) && note "kernel $KREL: no bpf_xdp_load_bytes before 5.18: XDP uses direct packet access"
  note "the agent probes these at load time (a backported one is used); \`meshctl status\` lists the fallbacks in force"
}

step_kernel() {
  load_kconfig
  check_kernel_version

  if [[ $(kconfig CONFIG_BPF_SYSCALL) == y ]]; then
    ok "bpf() syscall (CONFIG_BPF_SYSCALL=y)"
  elif [[ -e /proc/sys/kernel/unprivileged_bpf_disabled ]]; then
    ok "bpf() syscall (/proc/sys/kernel/unprivileged_bpf_disabled present)"
  else
    MISSING+=("the bpf() syscall (CONFIG_BPF_SYSCALL)")
  fi

  if [[ -r /sys/kernel/btf/vmlinux ]]; then
    ok "BTF (/sys/kernel/btf/vmlinux)"
  else
    MISSING+=("BTF (/sys/kernel/btf/vmlinux absent: CONFIG_DEBUG_INFO_BTF)")
  fi

  check_tristate "tc clsact" CONFIG_NET_SCH_INGRESS sch_ingress
  check_tristate "VXLAN" CONFIG_VXLAN vxlan

  local cg
  cg=$(stat -f -c %T /sys/fs/cgroup 2>/dev/null || true)
  if [[ $cg == cgroup2fs ]]; then
    ok "cgroup v2 at /sys/fs/cgroup"
  else
    note "cgroup v2 is not mounted at /sys/fs/cgroup (${cg:-nothing} there); not needed yet, used by a later feature"
  fi

  if ((${#MISSING[@]})); then
    local list="" m
    for m in "${MISSING[@]}"; do list+="${list:+; }$m"; done
    die "this kernel lacks what the mesh needs: $list; use a kernel that has them"
  fi
}

# --- 3. Docker -------------------------------------------------------------------------------

docker_install_cmd() {
  local ids
  # shellcheck source=/dev/null
  ids=$( (. /etc/os-release && printf '%s %s' "${ID:-}" "${ID_LIKE:-}") 2>/dev/null || true)
  case " $ids " in
    *" debian "* | *" ubuntu "*) echo apt ;;
    *" fedora "*) echo dnf ;;
    *) echo "" ;;
  esac
}

install_docker_apt() {
  run env DEBIAN_FRONTEND=noninteractive apt-get update
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io
}

install_docker_dnf() {
  run dnf install -y moby-engine
  if have systemctl; then
    run systemctl enable --now docker
  fi
}

step_docker() {
  local v=""
  if have dockerd; then
    v=$(dockerd --version 2>/dev/null || true)
  elif have docker; then
    v=$(docker --version 2>/dev/null || true)
  fi
  if have dockerd || have docker; then
    ok "Docker present (${v:-version unknown})"
    return 0
  fi
  if [[ -n $R ]]; then
    note "Docker is not installed on this system; with --root, install it in that image yourself (docker.io / moby-engine)"
    return 0
  fi
  ((DOCKER_INSTALL)) || die "Docker is not installed and --no-docker-install was given: install Docker (docker.io / moby-engine / docker-ce) and rerun"
  case $(docker_install_cmd) in
    apt) change "install Docker (apt-get update; apt-get install -y docker.io)" install_docker_apt ;;
    dnf) change "install Docker (dnf install -y moby-engine, systemctl enable --now docker)" install_docker_dnf ;;
    *) die "Docker is not installed and this is neither Debian/Ubuntu nor Fedora: install Docker yourself and rerun" ;;
  esac
}

# --- 4. bpffs ------------------------------------------------------------------------------------

bpffs_mounted() {
  local t
  t=$(stat -f -c %T "$BPFFS" 2>/dev/null || true)
  if [[ -n $t ]]; then
    [[ $t == bpf_fs ]]
  else
    awk -v m="$BPFFS" '$2 == m && $3 == "bpf" { f = 1 } END { exit !f }' /proc/self/mounts
  fi
}

step_bpffs() {
  if bpffs_mounted; then
    ok "bpffs mounted at $BPFFS"
  else
    change "mount bpffs at $BPFFS (mount -t bpf bpffs $BPFFS)" run mount -t bpf bpffs "$BPFFS"
  fi

  local fstab=$R/etc/fstab other=""
  if [[ -f $fstab ]]; then
    other=$(awk -v m="$BPFFS" '$1 !~ /^#/ && $2 == m { print $3; exit }' "$fstab" || true)
  fi
  if [[ $other == bpf ]]; then
    ok "$fstab mounts bpffs at $BPFFS at boot"
  elif [[ -n $other ]]; then
    note "$fstab mounts a \`$other\` file system at $BPFFS; left alone (the agent needs bpffs there)"
  else
    change "add \`$FSTAB_LINE\` to $fstab (bpffs at boot)" append_line "$fstab" "$FSTAB_LINE"
  fi
}

# --- 5. sysctls ----------------------------------------------------------------------------------

sysctl_get() {
  local p=/proc/sys/${1//.//}
  if [[ -r $p ]]; then
    cat -- "$p" 2>/dev/null || true
  fi
}

sysctl_set() {
  if have sysctl; then
    run sysctl -qw "$1=$2"
  else
    { printf '%s\n' "$2" >"/proc/sys/${1//.//}"; } 2>/dev/null || die "cannot set $1=$2 (/proc/sys read-only?)"
  fi
}

step_sysctl() {
  local conf=$R/etc/sysctl.d/90-mesh.conf entry kv key val why live content
  content="# Written by mesh's deploy/bootstrap-node.sh; rerun it rather than editing this file."$'\n'
  for entry in "${SYSCTLS[@]}"; do
    kv=${entry%%|*}
    why=${entry#*|}
    content+="# ${kv%%=*}: $why"$'\n'"${kv%%=*} = ${kv#*=}"$'\n'
  done
  ensure_file "$conf" 0644 "$content" "sysctls at boot"
  for entry in "${SYSCTLS[@]}"; do
    kv=${entry%%|*}
    key=${kv%%=*}
    val=${kv#*=}
    live=$(sysctl_get "$key")
    if [[ $live == "$val" ]]; then
      ok "$key = $val (live)"
    else
      change "sysctl -w $key=$val (live value: ${live:-unreadable})" sysctl_set "$key" "$val"
    fi
  done
}

# --- 6. firewall ---------------------------------------------------------------------------------

PORTS=()
set_ports() {
  PORTS=(2377/tcp 7946/tcp 7946/udp "$DATA_PATH_PORT/udp")
  ((PEER_PORT == 0)) || PORTS+=("$PEER_PORT/tcp")
}

fw_ufw() {
  local st p re
  st=$(ufw status 2>/dev/null || true)
  for p in "${PORTS[@]}"; do
    re="(^|"$'\n'")${p}[[:space:]]+ALLOW"
    if [[ $st =~ $re ]]; then
      ok "ufw allows $p"
    else
      change "ufw allow $p" run ufw allow "$p" comment "$RULE_TAG"
    fi
  done
}

fw_firewalld() {
  local p reload=0
  for p in "${PORTS[@]}"; do
    if firewall-cmd --permanent --query-port="$p" >/dev/null 2>&1; then
      if firewall-cmd --query-port="$p" >/dev/null 2>&1; then
        ok "firewalld allows $p"
      else
        reload=1
      fi
    else
      change "firewall-cmd --permanent --add-port=$p" run firewall-cmd --permanent --add-port="$p"
      reload=1
    fi
  done
  if ((reload)); then
    change "firewall-cmd --reload" run firewall-cmd --reload
  fi
}

# ipt_filters TOOL: whether that tool's INPUT chain drops what no rule accepts.
ipt_filters() {
  local rules line
  rules=$("$1" -w -S INPUT 2>/dev/null || true)
  while IFS= read -r line; do
    case $line in
      "-P INPUT DROP" | "-P INPUT REJECT" | "-A INPUT -j DROP" | "-A INPUT -j REJECT" | "-A INPUT -j REJECT "*) return 0 ;;
    esac
  done <<<"$rules"
  return 1
}

fw_iptables() {
  local tool=$1 p port proto spec
  for p in "${PORTS[@]}"; do
    port=${p%/*}
    proto=${p#*/}
    spec=(INPUT -p "$proto" --dport "$port" -m comment --comment "$RULE_TAG" -j ACCEPT)
    if "$tool" -w -C "${spec[@]}" >/dev/null 2>&1; then
      ok "$tool accepts $p"
    else
      change "$tool -I ${spec[*]}" run "$tool" -w -I "${spec[@]}"
    fi
  done
}

# nft base chains hooked at input with policy drop: "family table chain" per line.
nft_drop_chains() {
  local listing
  listing=$(nft list chains 2>/dev/null || true)
  awk '$1 == "table" { fam = $2; tab = $3 }
       $1 == "chain" { ch = $2 }
       /hook input/ && /policy drop/ && (fam == "inet" || fam == "ip" || fam == "ip6") { print fam, tab, ch }' <<<"$listing"
}

fw_nft() {
  local fam=$1 tab=$2 ch=$3 p port proto listing re
  listing=$(nft list chain "$fam" "$tab" "$ch" 2>/dev/null || true)
  for p in "${PORTS[@]}"; do
    port=${p%/*}
    proto=${p#*/}
    re="$proto dport $port [^"$'\n'"]*comment \"$RULE_TAG\""
    if [[ $listing =~ $re ]]; then
      ok "nft $fam $tab $ch accepts $p"
    else
      change "nft insert rule $fam $tab $ch $proto dport $port accept comment \"$RULE_TAG\"" \
        run nft insert rule "$fam" "$tab" "$ch" "$proto" dport "$port" accept comment "\"$RULE_TAG\""
    fi
  done
}

step_firewall() {
  set_ports
  local list
  list=$(printf '%s, ' "${PORTS[@]}")
  list=${list%, }
  if have ufw && [[ $(ufw status 2>/dev/null || true) == *"Status: active"* ]]; then
    fw_ufw
    return 0
  fi
  if have firewall-cmd && [[ $(firewall-cmd --state 2>/dev/null || true) == running ]]; then
    fw_firewalld
    return 0
  fi
  local filtered=0 tool handled=() chain
  for tool in iptables ip6tables; do
    if have "$tool" && ipt_filters "$tool"; then
      filtered=1
      fw_iptables "$tool"
      if [[ $tool == iptables ]]; then handled+=("ip filter INPUT"); else handled+=("ip6 filter INPUT"); fi
    fi
  done
  if have nft; then
    local chains
    chains=$(nft_drop_chains)
    while IFS= read -r chain; do
      [[ -n $chain ]] || continue
      case " ${handled[*]:-} " in *"$chain"*) continue ;; esac
      filtered=1
      # shellcheck disable=SC2086 # "family table chain", three words
      fw_nft $chain
    done <<<"$chains"
  fi
  if ((filtered)); then
    note "these rules are not saved across reboots by this script; persist them with your firewall's own tooling"
  else
    ok "no host firewall filters input; nothing to open (open $list between nodes in any external firewall)"
  fi
}

# --- 7. install ------------------------------------------------------------------------------------

install_one() {
  local src=$1 dst=$2 mode=$3
  if [[ -f $dst ]] && cmp -s -- "$src" "$dst"; then
    if [[ $(mode_of "$dst") == "${mode#0}" ]]; then
      ok "$dst up to date"
    else
      change "chmod $mode $dst" run chmod "$mode" "$dst"
    fi
  else
    local verb=install
    [[ -e $dst ]] && verb=update
    change "$verb $dst from $src (mode $mode)" copy_file "$src" "$dst" "$mode"
  fi
}

step_install() {
  install_one "$FROM/mesh-agent" "$R$PREFIX/bin/mesh-agent" 0755
  install_one "$FROM/meshctl" "$R$PREFIX/bin/meshctl" 0755
  install_one "$FROM/mesh.bpf.o" "$R$PREFIX/lib/mesh/mesh.bpf.o" 0644
  if [[ $PREFIX != /usr/local ]]; then
    note "the agent looks for its object at /usr/local/lib/mesh/mesh.bpf.o; with --prefix $PREFIX, set MESH_BPF_OBJECT=$PREFIX/lib/mesh/mesh.bpf.o"
  fi
}

# --- 8. settings -----------------------------------------------------------------------------------

step_settings() {
  local -a keys=(data-path-port peer-port) vals=("$DATA_PATH_PORT" "$PEER_PORT")
  local -a seen=(0 0)
  local old="" new="" line i what=()
  if [[ -f $SETTINGS ]]; then
    old=$(cat -- "$SETTINGS"; printf x) || die "cannot read $SETTINGS"
    old=${old%x}
  fi
  if [[ -n $old ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
      for i in "${!keys[@]}"; do
        if [[ $line =~ ^${keys[i]}[[:space:]]*: ]]; then
          if ((seen[i])); then
            line="" # a repeated key: drop it
            continue 2
          fi
          seen[i]=1
          if [[ $(line_value "${keys[i]}" "$line" || true) != "${vals[i]}" ]]; then
            what+=("${keys[i]}: ${vals[i]}")
            line="${keys[i]}: ${vals[i]}"
          fi
        fi
      done
      new+="$line"$'\n'
    done <<<"${old%$'\n'}"
  elif [[ ! -e $SETTINGS ]]; then
    new="# mesh-agent settings: the keys are mesh-agent's long flags (mesh-agent --help)."$'\n'
  fi
  for i in "${!keys[@]}"; do
    if ((!seen[i])); then
      new+="${keys[i]}: ${vals[i]}"$'\n'
      what+=("${keys[i]}: ${vals[i]}")
    fi
  done
  if [[ $new == "$old" ]]; then
    ok "$SETTINGS has data-path-port: $DATA_PATH_PORT, peer-port: $PEER_PORT"
  else
    local desc
    desc=$(printf '%s, ' "${what[@]}")
    desc=${desc%, }
    [[ -n $desc ]] || desc="one line per key (repeated data-path-port or peer-port lines dropped)"
    change "set ${desc} in $SETTINGS" write_file "$SETTINGS" 0644 "$new"
  fi
}

# --- 8b. state directory ----------------------------------------------------------------------------

# /run/mesh holds what a restarted agent adopts and what meshctl on the node reads;
# deploy/mesh-stack.yml bind-mounts it, and Docker refuses a bind whose source is missing.
# /run is empty after a boot: tmpfiles.d makes it again.
step_state() {
  ensure_file "$R/etc/tmpfiles.d/mesh.conf" 0644 \
    $'# mesh-agent\'s state directory (deploy/mesh-stack.yml mounts it)\nd /run/mesh 0755 root root -\n' \
    "makes /run/mesh at boot"
  if [[ -d $R/run/mesh ]]; then
    ok "$R/run/mesh exists"
  else
    change "mkdir $R/run/mesh (the agent's state; the stack mounts it)" run mkdir -p -- "$R/run/mesh"
  fi
}

# Docker's own mesh balances published ports and VIPs with IPVS; beside the mesh it would
# hold rules for the same ports (the mesh's hooks run first, so they stay unused, but
# two meshes on one node confuse whoever debugs it). Offered, never done unasked.
NO_IPVS_CONF=/etc/modprobe.d/mesh-no-ipvs.conf
step_ipvs() {
  local conf="$R$NO_IPVS_CONF" st
  st=$(module_status ip_vs)
  case $IPVS in
    off)
      ensure_file "$conf" 0644 \
        $'# Written by bootstrap-node.sh --keep-ipvs-off: keeps Docker\'s IPVS mesh off, so the\n# mesh alone serves published ports and VIPs. Undo: bootstrap-node.sh --allow-ipvs\n# (or delete this file).\nblacklist ip_vs\ninstall ip_vs /bin/false\n' \
        "keeps ip_vs from loading"
      if [[ $st == loaded ]]; then
        note "ip_vs is loaded now: Docker's IPVS mesh stays until the next boot (or stop Docker, \`modprobe -r ip_vs\`, start Docker)"
      fi
      ;;
    allow)
      if [[ -e $conf ]]; then
        change "remove $conf (ip_vs may load again)" run rm -f -- "$conf"
      else
        ok "nothing keeps ip_vs from loading ($conf absent)"
      fi
      ;;
    *)
      if [[ -e $conf ]]; then
        ok "ip_vs kept from loading ($conf): Docker's IPVS mesh stays off"
      elif [[ $st == loaded ]]; then
        note "ip_vs is loaded: Docker's IPVS mesh can run beside the mesh; rerun with --keep-ipvs-off to keep it off (undo: --allow-ipvs)"
      elif [[ $st == module || $st == builtin ]]; then
        note "ip_vs can load here ($st): Docker's IPVS mesh would start with its first published port; rerun with --keep-ipvs-off to keep it off (undo: --allow-ipvs)"
      else
        ok "no ip_vs on this kernel ($st): Docker's IPVS mesh stays off"
      fi
      ;;
  esac
}

# --- 9. what next ------------------------------------------------------------------------------------

step_next() {
  if ((DRY_RUN)); then
    echo "done: dry run, $CHANGES change(s) would be made"
  elif ((CHANGES)); then
    echo "done: $CHANGES change(s) made"
  else
    echo "done: nothing to change"
  fi
  echo "next: build the agent image with \`cargo xtask image\` (imports mesh/agent:latest into the local Docker); run it on every node, or copy it: \`docker save mesh/agent:latest | ssh NODE docker load\`"
  echo "next: on a manager, deploy the global service: \`docker stack deploy --resolve-image never -c deploy/mesh-stack.yml mesh\`"
  echo "next: check it on any node: \`meshctl status\`"
}

step_root
step_kernel
step_docker
step_bpffs
step_sysctl
step_firewall
step_install
step_settings
step_state
step_ipvs
step_next
