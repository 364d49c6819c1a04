"""The agent image: built here by `make image` (scripts/build-image.sh) and proven under the
DaemonSet's own security context on a node of the lab.

The image is (re)built by the module fixture when it is missing or its inputs changed; the build
script decides by a hash of its inputs, which it stores as a label of the image. Without root,
podman, buildah, mmdebstrap or runc the tests skip, saying which; with CI=true they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import have_bcc, require

import image_lab
from daemonset_podman import Untranslatable, translate

REPO = image_lab.REPO
IMAGE = image_lab.IMAGE
BUILD = REPO / "scripts" / "build-image.sh"
DIST = REPO / "dist"
SITE = "/usr/local/lib/python3.11/dist-packages"
SIZE_LIMIT = 500 * 1000 * 1000

# Capability numbers of linux/capability.h, for reading /proc/<pid>/status inside the container.
CAP_NUMBERS = {
    "NET_ADMIN": 12,
    "SYS_ADMIN": 21,
    "BPF": 39,
    "PERFMON": 38,
    "NET_RAW": 13,
    "SYS_RESOURCE": 24,
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "SETUID": 7,
}


def require_tools() -> None:
    require(os.geteuid() == 0, "needs root (podman's root storage, chroot, network namespaces)")
    for tool in ("podman", "buildah", "mmdebstrap", "runc"):
        require(
            shutil.which(tool) is not None,
            f"{tool} not installed (scripts/setup-image.sh installs it; make test runs it)",
        )


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def run_image(*args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    """A throwaway container of the image with nothing but the defaults."""
    argv = [*image_lab.PODMAN_RUN, "--rm", "--network=none"]
    if entrypoint:
        argv.append(f"--entrypoint={entrypoint}")
    return subprocess.run([*argv, IMAGE, *args], capture_output=True, text=True, timeout=120)


def inputs_hash(repo: Path = REPO, env: dict | None = None) -> str:
    out = subprocess.run(
        ["bash", str(repo / "scripts" / "build-image.sh"), "--inputs-hash"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def image() -> dict:
    """The image's `podman image inspect` record, built first when missing or stale."""
    require_tools()
    build = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"make image failed:\n{build.stderr[-4000:]}"
    return json.loads(podman("image", "inspect", IMAGE).stdout)[0]


# ---- the build ------------------------------------------------------------------------------


def test_image_carries_the_hash_of_the_current_inputs(image):
    assert image["Labels"]["org.nodecryptor.image.inputs"] == inputs_hash()
    assert (DIST / "nodecryptor-image.inputs").read_text().strip() == inputs_hash()


def test_inputs_hash_covers_what_ships_and_nothing_else(tmp_path):
    """A changed C source or agent module makes the image stale; a changed test does not."""
    copy = tmp_path / "repo"
    for part in ("pyproject.toml", "README.md", "nodecryptor", "bpf", "scripts", "tests/image"):
        src, dst = REPO / part, copy / part
        if src.is_dir():
            shutil.copytree(
                src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    before = inputs_hash(copy, env)
    (copy / "tests" / "image" / "test_image.py").write_text("# changed\n")
    assert inputs_hash(copy, env) == before
    for changed in ("bpf/nodecryptor.c", "nodecryptor/cli.py", "scripts/image/requirements.txt"):
        path = copy / changed
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert inputs_hash(copy, env) != before, f"{changed} is not an input of the image"
        path.write_bytes(original)
    assert inputs_hash(copy, env) == before
    assert inputs_hash(copy, dict(env, SOURCE_DATE_EPOCH="1700000001")) != before


def source_date_epoch() -> int:
    """What the build used: the environment's, else the last commit's time."""
    return int(
        os.environ.get("SOURCE_DATE_EPOCH")
        or subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def test_source_date_epoch_is_the_creation_time(image):
    epoch = source_date_epoch()
    assert (
        image["Labels"]["org.opencontainers.image.created"]
        == subprocess.run(
            ["date", "-u", "-d", f"@{epoch}", "+%Y-%m-%dT%H:%M:%SZ"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    stamp = run_image(
        "-c", "stat -c %Y /usr/bin/python3.11 /usr/local/bin/nodecryptor", entrypoint="/bin/sh"
    )
    assert stamp.returncode == 0, stamp.stderr
    assert set(stamp.stdout.split()) == {str(epoch)}


def test_dist_holds_an_oci_archive_of_the_image(image):
    archive = DIST / "nodecryptor-image.tar"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        # Repacked with SOURCE_DATE_EPOCH: the same image gives the same archive.
        assert {m.mtime for m in tar.getmembers()} == {source_date_epoch()}
        assert {"oci-layout", "index.json"} <= names
        index = json.load(tar.extractfile("index.json"))
        manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{manifest_digest}"))
        config = json.load(
            tar.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':', 1)[1]}")
        )
    assert config["config"]["Labels"] == image["Labels"]
    assert config["config"]["Entrypoint"] == ["nodecryptor"]


def test_package_manifest_lists_exact_versions(image):
    listed = run_image("/usr/share/nodecryptor/packages.txt", entrypoint="cat")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == (DIST / "nodecryptor-packages.txt").read_text()
    entries = {}
    for line in listed.stdout.splitlines():
        if line.startswith("#"):
            continue
        kind, name, version = line.split(" ")
        entries[(kind, name)] = version
    for package in ("python3", "python3-bpfcc", "libbpfcc", "xz-utils"):
        assert ("deb", package) in entries, package
    assert ("deb", "perl-base") not in entries
    # Every Python distribution in the image is one of the lock, at the locked version.
    lock = {}
    for line in (REPO / "scripts" / "image" / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split()[0].split("==")
            lock[name] = version
    pypi = {name: v for (kind, name), v in entries.items() if kind == "pypi"}
    assert pypi.pop("nodecryptor") is not None
    assert pypi == {n: v for n, v in lock.items() if n != "pip"}


def test_image_is_under_the_size_limit(image):
    assert image["Size"] < SIZE_LIMIT, f"{image['Size'] / 1e6:.0f} MB"


# ---- what is in it --------------------------------------------------------------------------


def test_entry_point_is_the_cli_and_the_default_command_runs_the_agent(image):
    config = image["Config"]
    assert config["Entrypoint"] == ["nodecryptor"]
    assert config["Cmd"] == ["run"]
    assert config.get("User") in ("0:0", "0", "root")
    # The DaemonSet keeps the entry point (no command:) and starts the same sub-command.
    ds_container = image_lab.daemonset()["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in ds_container and ds_container["args"][0] == "run"
    helped = run_image("--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: nodecryptor ")


LISTING = f"""
import importlib.util, json, os, sys
found = {{}}
for root in sys.path:
    if os.path.isdir(root):
        for entry in sorted(os.listdir(root)):
            found.setdefault(entry, root)
modules = []
for dirpath, dirnames, filenames in os.walk("{SITE}/nodecryptor"):
    modules += [os.path.join(dirpath, f) for f in filenames]
print(json.dumps({{"entries": found, "agent_files": modules,
                  "pip": importlib.util.find_spec("pip") is not None,
                  "testkit": importlib.util.find_spec("nodecryptor_testkit") is not None}}))
"""


def test_site_packages_hold_the_agent_and_nothing_of_the_lab(image):
    listed = run_image("-c", LISTING, entrypoint="python3")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)
    entries = found["entries"]
    assert not found["testkit"] and not found["pip"]
    for absent in ("nodecryptor_testkit", "pip", "pytest", "_pytest", "hypothesis", "setuptools"):
        assert absent not in entries, f"{absent} in {entries[absent]}"
    assert not [e for e in entries if e.startswith(("nodecryptor_testkit", "pip-"))]
    assert entries["nodecryptor"] == SITE
    assert entries["bcc"] == "/usr/lib/python3/dist-packages"
    for name in ("kubernetes", "pyroute2", "prometheus_client"):
        assert entries[name] == SITE, name
    relative = [os.path.relpath(p, f"{SITE}/nodecryptor") for p in found["agent_files"]]
    # No lab, fake API server or test helper modules under the agent package either.
    for path in relative:
        parts = path.split("/")
        assert not {"lab", "fakeapi", "testing", "testkit"} & set(parts), path
        assert parts[-1] not in ("netns.py", "demo.py", "standin.py", "scenarios.py"), path
    assert not [p for p in relative if "__pycache__" in p or p.endswith(".pyc")]


def test_bpf_sources_in_the_image_are_the_repositorys(image):
    script = (
        f"import hashlib, pathlib; r = pathlib.Path('{SITE}/nodecryptor/datapath/bpf/csrc');"
        "print('\\n'.join(f'{p.relative_to(r)} {hashlib.sha256(p.read_bytes()).hexdigest()}'"
        " for p in sorted(r.rglob('*')) if p.is_file()))"
    )
    listed = run_image("-c", script, entrypoint="python3")
    assert listed.returncode == 0, listed.stderr
    mine = "\n".join(
        f"{p.relative_to(REPO / 'bpf')} {hashlib.sha256(p.read_bytes()).hexdigest()}"
        for p in sorted((REPO / "bpf").rglob("*"))
        if p.is_file()
    )
    assert listed.stdout.strip() == mine


# ---- the DaemonSet's security context, translated ---------------------------------------------


def test_translation_takes_everything_from_the_manifest(tmp_path):
    ds = image_lab.daemonset()
    paths = {"/sys/fs/bpf": str(tmp_path), "/lib/modules": "/lib/modules", "/usr/src": "/usr/src"}
    run = translate(ds, "nodecryptor", "w9", paths, tmp_path)
    container = ds["spec"]["template"]["spec"]["containers"][0]
    caps = container["securityContext"]["capabilities"]
    assert run.options.count("--cap-drop=all") == 1 and caps["drop"] == ["ALL"]
    assert sorted(o.split("=", 1)[1] for o in run.options if o.startswith("--cap-add=")) == sorted(
        f"CAP_{c}" for c in caps["add"]
    )
    assert {
        "--network=host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--security-opt=no-new-privileges",
        "--user=0",
        "--env=NODE_NAME=w9",
    } <= set(run.options)
    assert "--node-name=w9" in run.args and run.args[0] == "run"
    assert run.host_mounts == {
        "/sys/fs/bpf": str(tmp_path),
        "/lib/modules": "/lib/modules",
        "/usr/src": "/usr/src",
    }
    assert f"--volume={tmp_path}:/sys/fs/bpf:rw,rslave" in run.options
    # A host path the test was not told about, or a privileged container, is refused.
    with pytest.raises(Untranslatable):
        translate(ds, "nodecryptor", "w9", {"/sys/fs/bpf": str(tmp_path)}, tmp_path)
    # Each change edits a fresh DaemonSet (and its container), handed in as arguments.
    for change in (
        lambda ds, c: c["securityContext"].update(privileged=True),
        lambda ds, c: c.update(command=["/bin/sh"]),
        lambda ds, c: ds["spec"]["template"]["spec"].update(hostPID=True),
        lambda ds, c: ds["spec"]["template"]["spec"].update(securityContext={"sysctls": []}),
    ):
        ds = image_lab.daemonset()
        container = ds["spec"]["template"]["spec"]["containers"][0]
        change(ds, container)
        with pytest.raises(Untranslatable):
            translate(ds, "nodecryptor", "w9", paths, tmp_path)


# ---- on a lab node ----------------------------------------------------------------------------

NODE = "w1"
CONTAINER_NAME = f"nodecryptor-image-test-{os.getpid()}"


@pytest.fixture(scope="module")
def lab(image, tmp_path_factory):
    """A three-node lab whose node w1 runs its agent from the image."""
    from nodecryptor_testkit.lab.lab import Lab
    from nodecryptor_testkit.lab.spec import make_spec

    for tool in ("tcpdump", "wg", "wireguard-go"):
        require(shutil.which(tool) is not None, f"{tool} not installed (the lab needs it)")
    ok, why = have_bcc()
    require(ok, why)
    scratch = tmp_path_factory.mktemp("image-emptydirs")
    the_lab = Lab(
        make_spec(3),
        datapath="bpf",
        agent_commands={NODE: image_lab.agent_command(CONTAINER_NAME, scratch)},
    )
    try:
        the_lab.up()
        yield the_lab
    finally:
        try:
            if the_lab.state is not None and NODE in the_lab.agents:
                the_lab.stop_agent(NODE)
        finally:
            the_lab.down()
            image_lab.remove_container(CONTAINER_NAME)


def exec_in_agent(lab, *args: str) -> subprocess.CompletedProcess:
    """A command in the running agent container, as `kubectl exec` would run it. A host-network
    container has no network namespace of its own: the command gets the caller's, so podman is
    entered into the node's first (as the kubelet's runtime runs in the node's)."""
    return subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{lab.nodes[NODE].netns}",
            "podman",
            "exec",
            CONTAINER_NAME,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def cap_names(mask: int) -> set[str]:
    names = {n: b for n, b in CAP_NUMBERS.items()}
    unknown = mask & ~sum(1 << b for b in names.values())
    assert unknown == 0, f"capabilities outside the known table: {unknown:#x}"
    return {n for n, b in names.items() if mask >> b & 1}


def test_agent_container_runs_with_exactly_the_daemonsets_context(lab):
    container = json.loads(podman("container", "inspect", CONTAINER_NAME).stdout)[0]
    assert container["State"]["Running"]
    assert container["HostConfig"]["ReadonlyRootfs"] is True
    status = exec_in_agent(lab, "cat", "/proc/1/status")
    assert status.returncode == 0, status.stderr
    fields = dict(line.split(":\t", 1) for line in status.stdout.splitlines() if ":\t" in line)
    wanted = {
        c.upper()
        for c in image_lab.daemonset()["spec"]["template"]["spec"]["containers"][0][
            "securityContext"
        ]["capabilities"]["add"]
    }
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert cap_names(int(fields[key], 16)) == wanted, key
    assert int(fields["CapAmb"], 16) == 0 and int(fields["CapInh"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Uid"].split()[0] == "0"
    env = exec_in_agent(lab, "printenv", "NODE_NAME")
    assert env.stdout.strip() == NODE
    # Read-only root; the DaemonSet's emptyDirs are writable.
    assert exec_in_agent(lab, "touch", "/usr/probe").returncode != 0
    assert exec_in_agent(lab, "touch", "/tmp/probe").returncode == 0
    mounts = exec_in_agent(lab, "cat", "/proc/1/mountinfo").stdout
    targets = {line.split()[4]: line for line in mounts.splitlines()}
    assert "/sys/fs/bpf" in targets and " bpf " in targets["/sys/fs/bpf"].split(" - ")[1] + " "
    # /lib is a link to usr/lib in the image (merged /usr), so /lib/modules lands there.
    for ro in ("/usr/lib/modules", "/usr/src"):
        assert targets[ro].split()[5].split(",")[0] == "ro", targets[ro]


def test_status_from_the_image_reports_the_bpf_datapath_ready(lab):
    out = exec_in_agent(lab, "nodecryptor", "status", "--json", "--bpffs=/sys/fs/bpf")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["datapath"], status["ready"]) == ("bpf", True), status.get("reason")
    # The agent's record of its choice, in the DaemonSet's /run/nodecryptor emptyDir.
    assert status["agent_choice"]["datapath"] == "bpf", status


def test_bpf_dump_from_the_image_decodes_the_pinned_maps(lab):
    out = exec_in_agent(lab, "nodecryptor", "bpf", "dump", "--json", "--bpffs=/sys/fs/bpf")
    assert out.returncode == 0, out.stderr
    maps = json.loads(out.stdout)["maps"]
    # Exactly the other nodes' addresses and pod CIDRs, as the agent read them from the API.
    want = set()
    for other in ("cp1", "w2"):
        node = lab.spec.node(other)
        want |= {
            f"{node.ipv4}/32",
            f"{node.ipv6}/128",
            str(node.pod_cidr_v4),
            str(node.pod_cidr_v6),
        }
    assert {d["prefix"] for d in maps["destinations"]} == want, maps["destinations"]


def test_matrix_scenario_passes_with_the_agent_from_the_image(lab):
    from nodecryptor_testkit.lab import report
    from nodecryptor_testkit.lab.flows import PortAllocator
    from nodecryptor_testkit.lab.scenarios import run_scenario

    result = run_scenario(lab, "matrix", PortAllocator())
    assert result.ok, "\n" + report.table(result)
    # The agent under test really is the container's: the lab holds no agent process of its
    # own for the node, and the container is still the one running.
    assert (
        podman(
            "container", "inspect", "--format", "{{.State.Running}}", CONTAINER_NAME
        ).stdout.strip()
        == "true"
    )


# Last: it restarts the node's agent, which changes the node's datapath.
def test_restarted_agent_from_the_image_keeps_the_bpf_datapath(lab):
    """A rolling update: the agent restarts with the previous agent's pins in place, under the
    DaemonSet's capabilities (no CAP_SYS_ADMIN), and stays on BPF. Each start loads its program
    into a fresh generation of maps instead of reopening pinned maps by id (which the kernel
    allows only with CAP_SYS_ADMIN); this test failed while the loader did that."""
    lab.stop_agent(NODE)
    lab.start_agent(NODE)
    lab.wait_agent_ready(NODE)
    out = exec_in_agent(lab, "nodecryptor", "status", "--json", "--bpffs=/sys/fs/bpf")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["datapath"] == "bpf", status.get("agent_choice")
