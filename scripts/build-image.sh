#!/usr/bin/env bash
# Build the agent image from Debian packages and wheels, on this machine, without a container
# registry (make image). Steps:
#
#   1. root filesystem: Debian bookworm with python3 and python3-bpfcc (scripts/image/rootfs.sh,
#      mmdebstrap), cached under $NODECRYPTOR_IMAGE_CACHE keyed by the recipe, the package list
#      and the apt sources;
#   2. wheels: the locked Python dependencies (scripts/image/requirements.txt, hashes checked)
#      downloaded on this machine, and a wheel of the agent built from the working tree (the
#      nodecryptor distribution: the agent and its BPF C sources, never nodecryptor_testkit);
#   3. assembly with buildah: the root filesystem, then pip (run from its wheel, not installed)
#      installs the agent offline into it inside a chroot; every file is stamped with
#      SOURCE_DATE_EPOCH; the image is committed as $NODECRYPTOR_IMAGE and saved as an OCI archive.
#
# Outputs: the image in podman's storage, dist/nodecryptor-image.tar (OCI archive),
# dist/nodecryptor-packages.txt (every Debian package and Python distribution in the image,
# exact versions; also /usr/share/nodecryptor/packages.txt inside it).
#
# The image is labelled with a hash of its inputs; when the image in storage and the archive carry
# the current hash nothing is rebuilt (--force rebuilds anyway). --inputs-hash prints the hash.
#
# Environment: SOURCE_DATE_EPOCH (default: the time of the last commit),
# NODECRYPTOR_IMAGE (default localhost/nodecryptor:dev), NODECRYPTOR_IMAGE_CACHE (default
# /var/cache/nodecryptor-image), NODECRYPTOR_IMAGE_APT_SOURCES (apt source files to build from;
# default: this machine's own).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
here="$repo/scripts/image"
image=${NODECRYPTOR_IMAGE:-localhost/nodecryptor:dev}
cache=${NODECRYPTOR_IMAGE_CACHE:-/var/cache/nodecryptor-image}
dist="$repo/dist"
pip="$repo/.venv/bin/pip"
log() { printf '[image] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

force=0
case "${1:-}" in
  --force) force=1 ;;
  --inputs-hash | "") ;;
  *) echo "usage: build-image.sh [--force | --inputs-hash]" >&2; exit 2 ;;
esac

if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
  SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null) \
    || die "not a git checkout: set SOURCE_DATE_EPOCH"
fi
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH: expected seconds"
export SOURCE_DATE_EPOCH

apt_sources() {
  if [[ -n "${NODECRYPTOR_IMAGE_APT_SOURCES:-}" ]]; then
    printf '%s\n' $NODECRYPTOR_IMAGE_APT_SOURCES
    return
  fi
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -s "$f" ]] && grep -q '^[^#]' "$f" && printf '%s\n' "$f"
  done
  return 0
}

# Everything that ends up in the image, or decides how: a change to any of it makes the image
# stale. Paths are listed with their content hash (links with their target).
inputs_hash() {
  {
    echo "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH image=$image"
    cd "$repo"
    find pyproject.toml README.md nodecryptor bpf scripts/build-image.sh scripts/podman-run.sh \
         scripts/image \( -name __pycache__ -o -name '*.egg-info' \) -prune -o \
         \( -type f -o -type l \) ! -name '*.pyc' -print | LC_ALL=C sort | while read -r f; do
      if [[ -L "$f" ]]; then echo "$f -> $(readlink "$f")"; else sha256sum "$f"; fi
    done
    apt_sources | while read -r f; do sha256sum "$f"; done
  } | sha256sum | cut -c1-32
}

hash=$(inputs_hash)
if [[ "${1:-}" == "--inputs-hash" ]]; then
  echo "$hash"; exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (chroot, and podman's root storage)"
for tool in mmdebstrap buildah podman runc; do
  command -v "$tool" >/dev/null || die "$tool not installed: run scripts/setup-image.sh"
done
[[ -x "$pip" ]] || die "$pip missing: run scripts/setup.sh"

mkdir -p "$cache" "$dist"
# One build at a time per cache (make image and the image test may race).
exec 9>"$cache/build.lock"
flock 9

label() {
  podman image inspect --format "{{ index .Labels \"org.nodecryptor.image.inputs\" }}" "$image" \
    2>/dev/null || true
}
if ((!force)) && [[ "$(label)" == "$hash" && -s "$dist/nodecryptor-image.tar" \
      && "$(cat "$dist/nodecryptor-image.inputs" 2>/dev/null)" == "$hash" ]]; then
  log "$image and dist/nodecryptor-image.tar are up to date (inputs $hash)"
  exit 0
fi
started=$(date +%s)

# ---- 1. root filesystem (cached) ----------------------------------------------------------
mapfile -t sources < <(apt_sources)
((${#sources[@]})) || die "no apt sources found (set NODECRYPTOR_IMAGE_APT_SOURCES)"
base_key=$(cat "$here/rootfs.sh" "$here/debian-packages.txt" "${sources[@]}" | sha256sum | cut -c1-16)
base="$cache/rootfs-$base_key.tar"
if [[ ! -s "$base" ]]; then
  log "building the Debian root filesystem (mmdebstrap; cached as $base)"
  if ! bash "$here/rootfs.sh" "$base.partial" "${sources[@]}" >"$cache/rootfs.log" 2>&1; then
    tail -n 30 "$cache/rootfs.log" >&2
    die "mmdebstrap failed; its whole output is in $cache/rootfs.log"
  fi
  mv "$base.partial" "$base"
  find "$cache" -maxdepth 1 -name 'rootfs-*.tar*' ! -name "$(basename "$base")" -delete
else
  log "Debian root filesystem from the cache: $base"
fi

# ---- 2. wheels ----------------------------------------------------------------------------
wheel_key=$(sha256sum "$here/requirements.txt" | cut -c1-16)
deps="$cache/wheels-$wheel_key"
if [[ ! -d "$deps" ]]; then
  log "downloading the locked Python dependencies (cached in $deps)"
  rm -rf "$deps.partial"
  # For the image's interpreter (Debian bookworm: CPython 3.11, glibc 2.36, x86_64), whatever
  # the build machine runs; --require-hashes: exactly the files of the lock.
  "$pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
    --platform manylinux_2_36_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --dest "$deps.partial" -r "$here/requirements.txt"
  mv "$deps.partial" "$deps"
  find "$cache" -maxdepth 1 -name 'wheels-*' ! -name "$(basename "$deps")" -exec rm -rf {} +
fi

work=$(mktemp -d "$cache/work.XXXXXX")
ctr=""
cleanup() {
  if [[ -n "$ctr" ]]; then
    buildah umount "$ctr" >/dev/null 2>&1 || true
    buildah rm "$ctr" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The agent's wheel, from a copy of the working tree holding only what the distribution is made
# of (no build droppings in the checkout; uncommitted changes are included, as in the hash).
mkdir -p "$work/src" "$work/wheels"
(cd "$repo" && tar --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - \
   pyproject.toml README.md nodecryptor bpf) | tar -C "$work/src" -xf -
log "building the nodecryptor wheel"
"$pip" wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$work/wheels" "$work/src"
agent_wheel=$(ls "$work/wheels"/nodecryptor-*.whl)
if python3 -m zipfile -l "$agent_wheel" | grep -q nodecryptor_testkit; then
  die "$agent_wheel contains nodecryptor_testkit"
fi
cp "$deps"/*.whl "$work/wheels/"

# ---- 3. assembly --------------------------------------------------------------------------
ctr=$(buildah from --quiet --name "nodecryptor-image-build-$$" scratch)
mnt=$(buildah mount "$ctr")
tar -C "$mnt" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"
mkdir -p "$mnt/tmp/wheels"
cp "$work/wheels"/*.whl "$mnt/tmp/wheels/"
in_root() { chroot "$mnt" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }

log "installing nodecryptor and its dependencies offline into the image"
pip_wheel=$(cd "$mnt/tmp/wheels" && ls pip-*.whl)
# No byte-code: the root filesystem is read-only and every file's time is rewritten below, so
# compiled files would only cost space (see README, "The image").
in_root python3 "/tmp/wheels/$pip_wheel/pip" install --quiet --no-index \
  --find-links /tmp/wheels --no-compile --no-cache-dir --break-system-packages \
  --root-user-action=ignore --disable-pip-version-check --no-warn-script-location nodecryptor
in_root python3 -c 'import nodecryptor, kubernetes, pyroute2, prometheus_client, bcc'
if in_root python3 -c 'import pip' 2>/dev/null; then die "pip ended up in the image"; fi

version=$(in_root python3 -c 'import importlib.metadata as m; print(m.version("nodecryptor"))')
mkdir -p "$mnt/usr/share/nodecryptor"
{
  echo "# nodecryptor $version image: every Debian package (dpkg) and Python distribution"
  echo "# (pip, /usr/local) it contains, with its exact version. SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH"
  in_root dpkg-query -W -f 'deb ${Package} ${Version}\n' | LC_ALL=C sort
  in_root python3 -c '
import importlib.metadata as m
for d in m.distributions(path=["/usr/local/lib/python3.11/dist-packages"]):
    print("pypi", d.metadata["Name"].lower().replace("_", "-"), d.version)' | LC_ALL=C sort
} > "$work/packages.txt"
cp "$work/packages.txt" "$mnt/usr/share/nodecryptor/packages.txt"

rm -rf "$mnt/tmp/wheels" "$mnt/root/.cache"
find "$mnt" -xdev -depth -name __pycache__ -type d -exec rm -rf {} +
# Device nodes come from the container runtime, not from the image.
find "$mnt/dev" -mindepth 1 -delete
buildah umount "$ctr" >/dev/null

created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
buildah config \
  --entrypoint '["nodecryptor"]' --cmd '["run"]' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env PYTHONDONTWRITEBYTECODE=1 --env PYTHONUNBUFFERED=1 \
  --user 0:0 --workingdir / --os linux --arch amd64 \
  --created-by "scripts/build-image.sh" \
  --label org.opencontainers.image.title=nodecryptor \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$revision" \
  --label org.opencontainers.image.created="$created" \
  --label org.nodecryptor.image.inputs="$hash" \
  "$ctr"

old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
log "committing $image"
# --timestamp: the image's creation time and every file's time are SOURCE_DATE_EPOCH, so the
# same inputs give the same layer.
buildah commit --quiet --format oci --identity-label=false --timestamp "$SOURCE_DATE_EPOCH" \
  --rm "$ctr" "$image" >/dev/null
ctr=""
new=$(podman image inspect --format '{{.Id}}' "$image")
if [[ -n "$old" && "$old" != "$new" ]]; then
  podman rmi "$old" >/dev/null 2>&1 || true  # the previous build, now untagged
fi

log "saving dist/nodecryptor-image.tar"
# podman writes the blobs deterministically but stamps the archive's own entries with the time
# of saving; repacked with SOURCE_DATE_EPOCH, the same image gives the same archive.
mkdir "$work/oci"
podman save --quiet --format oci-archive -o "$work/saved.tar" "$image"
tar -C "$work/oci" -xf "$work/saved.tar"
rm "$work/saved.tar"
(cd "$work/oci" && tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
   --numeric-owner --format=gnu -cf "$dist/nodecryptor-image.tar.partial" oci-layout index.json blobs)
mv "$dist/nodecryptor-image.tar.partial" "$dist/nodecryptor-image.tar"
cp "$work/packages.txt" "$dist/nodecryptor-packages.txt"
echo "$hash" > "$dist/nodecryptor-image.inputs"

# The entry point answers: the CLI's help, through the runtime set-up the tests use.
bash "$repo/scripts/podman-run.sh" --rm "$image" --help >/dev/null \
  || die "$image: nodecryptor --help failed"
size=$(podman image inspect --format '{{.Size}}' "$image")
log "built $image ($((size / 1000000)) MB, inputs $hash) in $(($(date +%s) - started)) s"
