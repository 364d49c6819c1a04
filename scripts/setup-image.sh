#!/usr/bin/env bash
# Idempotent set-up for building and running the agent image (make image, tests/image/): the
# Debian packages that build a root filesystem (mmdebstrap), assemble it into an OCI image
# (buildah) and run it (podman with runc), and a podman drop-in so that a plain `podman run`
# works on this machine. Safe to run again; changes only what is missing or different.
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

# Plain `podman run` on this machine: runc, and limits the container may actually have (the
# same choices as scripts/podman-run.sh, which the tests and make targets use explicitly;
# this drop-in is for commands typed by hand, e.g. `podman run --rm localhost/nodecryptor:dev
# --help`). Rewritten only when its content changes.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[[ $nofile == unlimited ]] && nofile=1048576
if [[ $nproc == unlimited ]] || ((nproc > 32768)); then nproc=32768; fi
conf=/etc/containers/containers.conf.d/50-nodecryptor.conf
want=$(printf '%s\n' "# Written by nodecryptor's scripts/setup-image.sh." "[containers]" \
  "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]" "[engine]" \
  "runtime = \"runc\"")
if [[ "$(cat "$conf" 2>/dev/null)" != "$want" ]]; then
  mkdir -p "$(dirname "$conf")"
  printf '%s\n' "$want" > "$conf"
  log "wrote $conf (runc, nofile $nofile, nproc $nproc)"
fi
