#!/usr/bin/env bash
# `podman run` as this project runs its image: with runc, and with the open-file and process
# limits of the calling shell. Arguments are podman run's.
#
# Why: podman's default runtime here would be crun, and crun 1.8 (Debian bookworm) refuses
# a host with the hybrid cgroup layout; podman also asks for an open-file limit (1,048,576)
# above the hard limit a sandboxed host may set (20,000 on the development machine), which
# fails in setrlimit. runc with the caller's own hard limits works on both kinds of host,
# except that the process limit can be at most 32,768: podman starts its container monitor
# (conmon) with that hard limit, and the container inherits it.
#
# Inside a node's network namespace use `nsenter --net=/run/netns/NAME` and --network=host:
# `ip netns exec` remounts /sys, and podman then finds no cgroup file system.
set -euo pipefail
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[[ $nofile == unlimited ]] && nofile=1048576
if [[ $nproc == unlimited ]] || ((nproc > 32768)); then nproc=32768; fi
exec podman --runtime runc run --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" "$@"
