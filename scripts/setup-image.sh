#!/usr/bin/env bash
# Idempotent set-up for building and running the agent image (make image, tests/image/): the
# Debian packages that build a root filesystem (mmdebstrap), assemble it into an OCI image
# (buildah) and run it (podman with runc). Safe to run again; installs only what is missing.
set -euo pipefail

log() { printf '[setup-image] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (apt, and building a root filesystem needs chroot)"; exit 1
fi

# runc, not crun: crun 1.8 (bookworm) refuses a hybrid cgroup layout and raises RLIMIT_NOFILE
# above what a sandbox may allow; scripts/podman-run.sh picks runc explicitly.
APT_PACKAGES=(mmdebstrap buildah podman runc debian-archive-keyring)

missing=()
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
