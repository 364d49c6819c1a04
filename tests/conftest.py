"""Shared fixtures. Feature requirements fail on CI (CI=true) instead of skipping, so a machine
that should have a feature cannot hide a regression behind a skip."""

from __future__ import annotations

import os
import shutil

import pytest

from nodecryptor_testkit import netns as netns_mod

ON_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, why: str) -> None:
    """Skip with ``why`` when ``condition`` is false, but fail on CI."""
    if condition:
        return
    if ON_CI:
        pytest.fail(f"required on CI: {why}")
    pytest.skip(why)


def have_bcc() -> tuple[bool, str]:
    try:
        import bcc  # noqa: F401 - only whether it imports matters
    except Exception as e:  # ImportError, or libbcc failing to load
        return False, f"bcc not importable: {e}"
    kdir = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(kdir) and not os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return False, f"no kernel headers at {kdir}"
    return True, ""


@pytest.fixture
def root():
    require(os.geteuid() == 0, "needs root")


@pytest.fixture
def bcc_available(root):
    ok, why = have_bcc()
    require(ok, why)


@pytest.fixture
def wireguard_go(root):
    require(shutil.which("wireguard-go") is not None, "wireguard-go not installed")


@pytest.fixture
def netns(root):
    """Factory: ``netns("tag")`` returns a fresh namespace name; all are deleted on teardown."""
    created = []

    def make(tag: str = "t") -> str:
        name = netns_mod.create(tag)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        netns_mod.delete(name)


@pytest.fixture
def bpffs(tmp_path, root):
    """A private bpffs mount, so pins of one test never meet another's."""
    path = tmp_path / "bpffs"
    path.mkdir()
    rc = os.system(f"mount -t bpf bpf {path}")
    require(rc == 0, "cannot mount a bpffs")
    yield str(path)
    os.system(f"umount {path}")
