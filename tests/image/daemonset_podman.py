"""Translate the agent container of k8s/daemonset.yaml into `podman run` options, so the image
test runs the image exactly as the DaemonSet would: host network, the capabilities it adds and
no other, read-only root, its seccomp/AppArmor and privilege-escalation settings, user, memory
limit, grace period, environment and volumes. Everything is read from the manifest; a field this
module does not know how to translate raises, so a change to the manifest cannot be silently
ignored by the test; the fields that do not change how the container runs on its node
(scheduling, probes, the image reference) are listed below with the reason they are skipped.

The caller supplies where each hostPath volume is on the machine the container runs on (the lab
node's own bpffs instead of /sys/fs/bpf) and a scratch directory for emptyDir volumes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Fields that have no effect on how the container runs on its node, and why.
_POD_IGNORED = {
    "serviceAccountName",  # API credentials: the lab hands the agent a kubeconfig instead
    "priorityClassName",
    "tolerations",  # scheduling
}
_POD_TRANSLATED = {
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "terminationGracePeriodSeconds",
    "containers",
    "volumes",
}
_CONTAINER_IGNORED = {
    "image",
    "imagePullPolicy",  # the image under test is given
    "ports",  # informational with the host network
    "startupProbe",
    "livenessProbe",
    "readinessProbe",  # the lab polls /readyz itself
}
_CONTAINER_TRANSLATED = {"name", "args", "env", "resources", "securityContext", "volumeMounts"}

# Kubernetes mount propagation -> the bind option that gives the same behaviour.
_PROPAGATION = {
    None: "rprivate",
    "None": "rprivate",
    "HostToContainer": "rslave",
    "Bidirectional": "rshared",
}
_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi)?$")
_UNITS = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


class Untranslatable(ValueError):
    """The manifest uses something this translation does not handle (yet)."""


def quantity_bytes(text: str) -> int:
    match = _QUANTITY.match(str(text))
    if not match:
        raise Untranslatable(f"quantity {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class ContainerRun:
    """`podman run` options and the container's arguments, derived from the manifest."""

    options: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    host_mounts: dict[str, str] = field(default_factory=dict)
    """container path -> host path of every hostPath volume, as mapped by the caller."""


def _security_options(ctx: dict) -> list[str]:
    known = {
        "privileged",
        "allowPrivilegeEscalation",
        "runAsUser",
        "runAsNonRoot",
        "readOnlyRootFilesystem",
        "capabilities",
        "seccompProfile",
        "appArmorProfile",
    }
    unknown = set(ctx) - known
    if unknown:
        raise Untranslatable(f"securityContext fields {sorted(unknown)}")
    if ctx.get("privileged"):
        raise Untranslatable("privileged: true (the test would prove nothing)")
    opts: list[str] = []
    caps = ctx.get("capabilities", {})
    if [c.upper() for c in caps.get("drop", [])] != ["ALL"]:
        raise Untranslatable(f"capabilities.drop {caps.get('drop')}: expected [ALL]")
    opts.append("--cap-drop=all")
    opts += [f"--cap-add=CAP_{c.upper()}" for c in caps.get("add", [])]
    if ctx.get("readOnlyRootFilesystem"):
        # Only the root file system: podman would otherwise also put tmpfs on /tmp, /run and
        # /var/tmp, which the pod does not have.
        opts += ["--read-only", "--read-only-tmpfs=false"]
    if ctx.get("allowPrivilegeEscalation") is False:
        opts.append("--security-opt=no-new-privileges")
    if "runAsUser" in ctx:
        opts.append(f"--user={int(ctx['runAsUser'])}")
    for key, flag in (("seccompProfile", "seccomp"), ("appArmorProfile", "apparmor")):
        kind = ctx.get(key, {}).get("type", "RuntimeDefault")
        if kind == "Unconfined":
            opts.append(f"--security-opt={flag}=unconfined")
        elif kind != "RuntimeDefault":
            raise Untranslatable(f"{key} {kind}")
    return opts


def _env(container: dict, node_name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = node_name
        else:
            raise Untranslatable(f"env {var['name']}: {var}")
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container arguments."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def translate(
    daemonset: dict, container_name: str, node_name: str, host_paths: dict[str, str], scratch: Path
) -> ContainerRun:
    """The `podman run` options for ``container_name`` of ``daemonset`` on ``node_name``.

    ``host_paths`` maps each hostPath of the manifest to the path that stands for it here;
    a hostPath without an entry raises (a new host mount must be considered by the test).
    emptyDir volumes on disk become directories under ``scratch``; in memory, a tmpfs."""
    pod = daemonset["spec"]["template"]["spec"]
    unknown = set(pod) - _POD_IGNORED - _POD_TRANSLATED
    if unknown:
        raise Untranslatable(f"pod spec fields {sorted(unknown)}")
    if len(pod["containers"]) != 1:
        raise Untranslatable(f"{len(pod['containers'])} containers: expected the agent alone")
    container = next(c for c in pod["containers"] if c["name"] == container_name)
    unknown = set(container) - _CONTAINER_IGNORED - _CONTAINER_TRANSLATED
    if unknown:
        # "command" among them: the image's entry point is what the test checks.
        raise Untranslatable(f"container fields {sorted(unknown)}")
    if set(container.get("resources", {})) - {"requests", "limits"} or set(
        container.get("resources", {}).get("limits", {})
    ) - {"memory"}:
        raise Untranslatable(f"resources {container['resources']}")
    run = ContainerRun()
    if pod.get("hostNetwork"):
        run.options.append("--network=host")
    for key in ("hostPID", "hostIPC"):
        if pod.get(key):
            raise Untranslatable(key)
    ctx = container.get("securityContext", {})
    run.options += _security_options(ctx)
    run.capabilities = [c.upper() for c in ctx.get("capabilities", {}).get("add", [])]
    env = _env(container, node_name)
    run.options += [f"--env={k}={v}" for k, v in env.items()]
    run.args = [_expand(a, env) for a in container.get("args", [])]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        run.options.append(f"--memory={quantity_bytes(limits['memory'])}")
    if "terminationGracePeriodSeconds" in pod:
        run.options.append(f"--stop-timeout={int(pod['terminationGracePeriodSeconds'])}")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        unknown = set(mount) - {"name", "mountPath", "readOnly", "mountPropagation"}
        if unknown:
            raise Untranslatable(f"volumeMount {mount['name']}: {sorted(unknown)}")
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        if "hostPath" in volume:
            source_in_manifest = volume["hostPath"]["path"]
            if source_in_manifest not in host_paths:
                raise Untranslatable(f"hostPath {source_in_manifest}: no stand-in given")
            source = host_paths[source_in_manifest]
            if volume["hostPath"].get("type") == "Directory" and not os.path.isdir(source):
                raise Untranslatable(f"hostPath {source_in_manifest} -> {source}: not a directory")
            opts = [
                "ro" if mount.get("readOnly") else "rw",
                _PROPAGATION[mount.get("mountPropagation")],
            ]
            run.options.append(f"--volume={source}:{target}:{','.join(opts)}")
            run.host_mounts[target] = source
        elif "emptyDir" in volume:
            empty = volume["emptyDir"] or {}
            if empty.get("medium") == "Memory":
                size = empty.get("sizeLimit")
                suffix = f",size={quantity_bytes(size)}" if size else ""
                run.options.append(f"--tmpfs={target}:rw{suffix}")
            else:
                path = scratch / mount["name"]
                path.mkdir(parents=True, exist_ok=True)
                run.options.append(f"--volume={path}:{target}:rw")
        else:
            raise Untranslatable(f"volume {mount['name']}: {sorted(volume)}")
    return run
