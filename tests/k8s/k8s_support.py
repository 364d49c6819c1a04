"""Support for the Kubernetes tests: an in-process fake API server, a kubeconfig pointing at
it, fast Settings, and a running CiliumNodeSync that is always stopped on teardown.

Test modules import the fixtures from here rather than from a tests/k8s/conftest.py, which
would shadow tests/conftest.py for ``from conftest import require``."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import pytest

from conftest import require
from nodecryptor.cluster.sync import CiliumNodeSync
from nodecryptor.core.backoff import Backoff
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store
from nodecryptor_testkit.fakeapi import FakeApiServer, make_ciliumnode, make_node

TOKEN = "test-token-k8s"


def node(i: int, **kw) -> dict:
    """Worker ``n<i>`` with addresses and pod CIDRs derived from ``i`` (up to 65,535)."""
    hi, lo = divmod(i, 256)
    return make_ciliumnode(
        f"n{i:05d}",
        ipv4=f"172.16.{hi}.{lo}",
        ipv6=f"fd50::{i:x}",
        pod_cidrs=[f"10.{hi}.{lo}.0/24"],
        **kw,
    )


def kube_node(i: int, **kw) -> dict:
    """The v1 Node of ``node(i)``: its kubelet reports the same addresses."""
    hi, lo = divmod(i, 256)
    return make_node(f"n{i:05d}", ipv4=f"172.16.{hi}.{lo}", ipv6=f"fd50::{i:x}", **kw)


def restarts(metrics: Metrics, cause: str) -> float:
    value = metrics.registry.get_sample_value("nodecryptor_watch_restarts_total", {"cause": cause})
    return value or 0.0


@pytest.fixture
def fake():
    server = FakeApiServer(token=TOKEN, bookmark_interval=3600)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def kubeconfig(fake, tmp_path):
    return fake.write_kubeconfig(str(tmp_path / "kubeconfig"))


@pytest.fixture
def settings(kubeconfig):
    """Settings with timings small enough for tests (seconds, not minutes)."""
    return Settings(
        kubeconfig=kubeconfig,
        list_page_size=50,
        watch_timeout_seconds=5,
        request_timeout_seconds=1.0,
        resync_seconds=3600,
    )


class Running:
    """A CiliumNodeSync running in a thread."""

    def __init__(self, settings: Settings, **kw):
        self.store = Store()
        self.metrics = Metrics()
        kw.setdefault("backoff", Backoff(initial=0.05, maximum=0.4, jitter=0.2))
        kw.setdefault("read_timeout_margin", 0.5)
        self.sync = CiliumNodeSync(settings, self.store, self.metrics, **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sync.run, args=(self.stop,), daemon=True)

    def start(self, wait_synced: bool = True) -> "Running":
        self.thread.start()
        if wait_synced:
            assert self.store.synced.wait(10), "first list never completed"
        return self

    def halt(self) -> float:
        started = time.monotonic()
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "sync did not stop"
        return time.monotonic() - started


@pytest.fixture
def run_sync():
    """Factory ``run_sync(settings, **CiliumNodeSync kwargs)``; all are stopped on teardown."""
    started: list[Running] = []

    def make(settings: Settings, wait_synced: bool = True, **kw) -> Running:
        r = Running(settings, **kw)
        started.append(r)
        return r.start(wait_synced)

    yield make
    for r in started:
        if r.thread.is_alive():
            r.halt()


def require_openssl() -> None:
    """The fake's TLS certificate comes from the openssl CLI (scripts/setup.sh installs it)."""
    require(shutil.which("openssl") is not None, "openssl CLI not installed")


def with_settings(settings: Settings, **changes) -> Settings:
    return dataclasses.replace(settings, **changes)
