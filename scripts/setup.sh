#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian (bookworm) machine: system packages, kernel headers for
# BCC, bpffs, and the project virtualenv at .venv/. Safe to run again; does nothing that is done.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"
log() { printf '[setup] %s\n' "$*" >&2; }

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt, /lib/modules links, bpffs mount)"; exit 1
  fi
}

APT_PACKAGES=(
  python3 python3-venv python3-bpfcc bpfcc-tools libbpfcc
  linux-headers-amd64 iproute2 wireguard-tools wireguard-go tcpdump
  iputils-ping netcat-openbsd socat ethtool util-linux procps make libcap2-bin openssl
  prometheus
)

apt_install() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "apt packages present"
  fi
}

# BCC compiles against kernel headers found at /lib/modules/$(uname -r)/build. Kernels without
# their own headers get Debian's linux-headers-amd64 linked there; tc programs use only the
# stable UAPI, so headers of an older kernel compile programs that load on a newer one.
kernel_headers() {
  local kdir="/lib/modules/$(uname -r)"
  if [[ -e "$kdir/build/include/linux/kconfig.h" || -e /sys/kernel/kheaders.tar.xz ]]; then
    log "kernel headers present for $(uname -r)"; return
  fi
  local hdr common
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [[ -z "$hdr" || -z "$common" ]]; then
    log "no Debian linux-headers found under /usr/src"; exit 1
  fi
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  log "linked $kdir/build -> $hdr and $kdir/source -> $common"
}

bpffs() {
  if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf && log "mounted bpffs at /sys/fs/bpf"
  fi
}

make_venv() {
  if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    /usr/bin/python3 -m venv "$venv"
  fi
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # Expose only Debian's bcc package, not the rest of dist-packages. The PyPI project called
  # "bcc" is an unrelated placeholder and must never be installed.
  if [[ -d /usr/lib/python3/dist-packages/bcc ]]; then
    ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
  fi
  # Two distributions, both editable: the agent (with the test tools as its extra) and the
  # development-only testkit (lab, fake API server, nodecryptor-demo).
  local stamp="$venv/.installed-$(cat "$repo/pyproject.toml" "$repo/nodecryptor_testkit/pyproject.toml" \
                                  | sha256sum | cut -c1-16)"
  if [[ ! -e "$stamp" ]]; then
    log "installing nodecryptor and nodecryptor-testkit (editable) with test extras"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q -e "$repo[test]" -e "$repo/nodecryptor_testkit"
    rm -f "$venv"/.installed-*
    touch "$stamp"
  else
    log "venv up to date"
  fi
}

need_root
apt_install
kernel_headers
bpffs
make_venv
log "done"
