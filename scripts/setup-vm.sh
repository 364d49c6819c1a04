#!/usr/bin/env bash
# Idempotent set-up for the kernel-VM integration tests (vm-tests/): Debian's 6.1 kernel image
# (it has the WireGuard module this machine's kernel lacks) with headers of exactly the same
# version (BCC compiles against them inside the guest), qemu, the guest-side tools, and
# virtme-ng in its own virtualenv under vm-tests/.cache/ so the project venv stays untouched.
# Safe to run again; does nothing that is already done.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache="$repo/vm-tests/.cache"
venv="$cache/venv"
# Pinned: the harness relies on vng's --disable-kvm, --rwdir and --exec behaviour of this line.
VIRTME_NG="virtme-ng==1.42"
log() { printf '[setup-vm] %s\n' "$*" >&2; }

APT_PACKAGES=(
  linux-image-amd64 linux-headers-amd64 qemu-system-x86 busybox-static
  python3 python3-venv python3-bpfcc iproute2 wireguard-tools tcpdump iperf3 procps
)

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (apt)"; exit 1
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_install() {
  local missing=() p
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "apt packages present"
  fi
}

# The meta packages can move independently (a security update of one before the other), so
# check the concrete image version and install headers of that exact version.
matching_headers() {
  local ver
  ver=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V | tail -n 1)
  if [[ -z "$ver" ]]; then
    log "no /boot/vmlinuz-*-amd64 after installing linux-image-amd64"; exit 1
  fi
  apt_install "linux-headers-$ver"
  if [[ ! -e "/lib/modules/$ver/build/include/generated/autoconf.h" ]]; then
    log "headers for $ver incomplete: /lib/modules/$ver/build"; exit 1
  fi
  log "guest kernel $ver with matching headers"
}

make_venv() {
  if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    mkdir -p "$cache"
    /usr/bin/python3 -m venv "$venv"
  fi
  if [[ ! -e "$venv/.installed-$VIRTME_NG" ]]; then
    log "installing $VIRTME_NG"
    "$venv/bin/pip" install -q "$VIRTME_NG"
    rm -f "$venv"/.installed-*
    touch "$venv/.installed-$VIRTME_NG"
  else
    log "$VIRTME_NG present"
  fi
}

apt_install "${APT_PACKAGES[@]}"
matching_headers
make_venv
log "done"
