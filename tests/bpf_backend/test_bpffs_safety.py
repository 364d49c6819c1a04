"""bpffs safety: nodecryptor's pin directories are created 0700 and root-owned, and a
directory someone else owns or may write to is refused, naming path, owner and mode. Such a
user could unlink the tcx link pin, the link's only reference, which detaches the program."""

from __future__ import annotations

import os
import stat

import pytest

from nodecryptor.datapath import select
from nodecryptor.datapath.choice import last_choice
from nodecryptor.datapath.bpf import pins
from nodecryptor.datapath.bpf.backend import BpfDatapath
from nodecryptor.core.errors import DatapathError
from nodecryptor.core.settings import Settings

pytestmark = pytest.mark.privileged

NOBODY = 65534


def test_directories_are_created_0700_and_root_owned(bpffs):
    pins.ensure_dirs(bpffs)
    for path in (pins.root(bpffs), pins.abi_dir(bpffs), pins.links_dir(bpffs)):
        st = os.lstat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), path
    pins.ensure_dirs(bpffs)  # existing safe directories are fine


def _precreate(bpffs, which, uid=0, mode=0o700):
    pins.ensure_dirs(bpffs)
    path = {"root": pins.root(bpffs), "maps": pins.abi_dir(bpffs), "links": pins.links_dir(bpffs)}[
        which
    ]
    os.chown(path, uid, -1)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    "which,uid,mode,why",
    [
        ("root", NOBODY, 0o700, f"owned by uid {NOBODY}"),
        ("root", 0, 0o777, "writable by group or others"),
        ("links", NOBODY, 0o755, f"owned by uid {NOBODY}"),
        ("maps", 0, 0o770, "writable by group or others"),
        ("links", 0, 0o1733, "writable by group or others"),
    ],
)
def test_foreign_or_writable_directory_is_refused(bpffs, which, uid, mode, why):
    path = _precreate(bpffs, which, uid, mode)
    with pytest.raises(pins.UnsafePinDir) as err:
        pins.ensure_dirs(bpffs)
    text = str(err.value)
    assert path in text and f"uid {uid}" in text and f"mode {mode:04o}" in text and why in text
    assert isinstance(err.value, DatapathError)


def test_symlinked_directory_is_refused(bpffs, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, pins.root(bpffs))
    with pytest.raises(pins.UnsafePinDir, match="not a directory"):
        pins.ensure_dirs(bpffs)


def test_bpf_datapath_refuses_to_start_before_compiling(bpffs):
    path = _precreate(bpffs, "root", NOBODY, 0o777)
    datapath = BpfDatapath(Settings(bpffs=bpffs))
    with pytest.raises(DatapathError, match=f"refusing pin directory {path}"):
        datapath.start()
    assert datapath.prog_id == 0


def test_auto_datapath_says_why_it_fell_back(bpffs, monkeypatch, tmp_path):
    """With --datapath auto the agent falls back to ip rules and its recorded reason names
    the directory, its owner and mode."""
    path = _precreate(bpffs, "links", NOBODY, 0o777)

    class FakeIpRule:
        name = "iprule"

    monkeypatch.setattr(select, "_start_iprule", lambda settings, metrics, netns: FakeIpRule())
    settings = Settings(bpffs=bpffs, datapath="auto", run_dir=str(tmp_path))
    datapath, reason = select.choose_datapath(settings)
    assert datapath.name == "iprule"
    assert "fell back to ip rules" in reason
    assert path in reason and f"uid {NOBODY}" in reason and "mode 0777" in reason
    assert last_choice(settings)["reason"] == reason
