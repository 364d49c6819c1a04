#!/usr/bin/env bash
# The Debian part of the agent image: a bookworm root filesystem, as a tarball, with the packages
# of debian-packages.txt and nothing a running agent does not read. Called by build-image.sh,
# which caches the result keyed by this file, the package list and the apt sources.
#
#   rootfs.sh OUT.tar SOURCES...
#
# SOURCES are apt source files (one-line or deb822), normally the build machine's own: the image
# is built from the same Debian archive the machine installs from, and nothing else is fetched.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$1; shift
(($#)) || { echo "usage: rootfs.sh OUT.tar SOURCES..." >&2; exit 2; }

packages=$(grep -v '^\s*\(#\|$\)' "$here/debian-packages.txt" | paste -sd, -)

# Never written: documentation, manual pages, translations (the copyright files stay: they are
# the licences of what the image redistributes).
dpkg_opts=()
for dir in doc man info locale lintian bug; do
  dpkg_opts+=("--dpkgopt=path-exclude=/usr/share/$dir/*")
done
dpkg_opts+=("--dpkgopt=path-include=/usr/share/doc/*/copyright")

# After installation, remove what only installing needed. perl-base is Essential (dpkg and
# debconf maintainer scripts use it) but nothing runs it afterwards; dpkg's database stays, so
# scanners still see every package and version. The build host's apt configuration and the
# byte-code Debian compiled at install time go too: build-image.sh sets every file's time to
# SOURCE_DATE_EPOCH, which would make those caches stale anyway.
trim='set -e
chroot "$1" dpkg --purge --force-remove-essential --force-depends perl-base >/dev/null 2>&1
rm -rf "$1"/etc/apt/sources.list.d/* "$1"/var/log/* "$1"/var/lib/dpkg/*-old \
       "$1"/usr/share/common-licenses "$1"/usr/share/zsh "$1"/usr/share/bash-completion
find "$1"/usr/lib/python3* -depth -name __pycache__ -type d -exec rm -rf {} +'

# merged-usr: /bin, /lib, /sbin as links into /usr, the bookworm layout, without the usrmerge
# package (which would pull in perl).
mmdebstrap --quiet --variant=essential --mode=root --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include="$packages" "${dpkg_opts[@]}" \
  --customize-hook="$trim" \
  bookworm "$out" "$@"
