"""promtool for the monitoring tests: found on PATH (Debian's prometheus package, installed by
scripts/setup.sh), required on CI, and run on files written to a temporary directory."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from conftest import require


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool not installed (Debian package prometheus)")
    return path


def run(promtool: str, *args: str, cwd=None, stdin: str | None = None):
    return subprocess.run(
        [promtool, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120
    )


def write_yaml(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def check_expressions(promtool: str, tmp_path, exprs: dict[str, str]):
    """Parse PromQL expressions with `promtool check rules` (each as a recording rule: the
    check parses every expression without needing a server). Returns the completed run."""
    rules = [{"record": f"check:{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    path = write_yaml(tmp_path / "exprs.yaml", {"groups": [{"name": "exprs", "rules": rules}]})
    return run(promtool, "check", "rules", path)


class ScrapedAgent:
    """An in-process agent (the real wiring: sync, reconcile loop, endpoints, with the BPF
    counters collector registered on a bpffs that has no pins, so its families are declared
    but empty) against the fake API server; ``scrape()`` GETs its /metrics over HTTP."""

    def __init__(self, tmp_path, workers: int = 2):
        import threading

        from nodecryptor.agent.wiring import Agent
        from nodecryptor.core.settings import Settings
        from nodecryptor.datapath.base import FakeDatapath
        from nodecryptor.datapath.bpf import collector
        from nodecryptor_testkit.fakeapi import FakeApiServer

        self.fake = FakeApiServer(
            token="monitoring", objects=[self.node(i) for i in range(1, workers + 1)]
        )
        self.fake.start()
        settings = Settings(
            node_name="w1",
            kubeconfig=self.fake.write_kubeconfig(str(tmp_path / "kubeconfig")),
            health_bind="127.0.0.1:0",
            metrics_bind="127.0.0.1:0",
            bpffs=str(tmp_path / "no-bpffs"),
            request_timeout_seconds=2.0,
            reconcile_seconds=5,
            debounce_seconds=0.05,
        )
        self.agent = Agent(settings)
        collector.register(self.agent.metrics.registry, settings)
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self.agent.run, args=(FakeDatapath(), self.stop), daemon=True
        )
        self.thread.start()

    @staticmethod
    def node(i: int) -> dict:
        from nodecryptor_testkit.fakeapi import make_ciliumnode

        return make_ciliumnode(
            f"w{i}", ipv4=f"192.0.2.{i}", pod_cidrs=[f"10.{i // 256}.{i % 256}.0/24"]
        )

    def scrape(self) -> str:
        import urllib.request

        url = f"http://127.0.0.1:{self.agent.metrics_http.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def value(self, text: str, name: str) -> float:
        """Sum of the samples of ``name`` in ``text``."""
        from prometheus_client.parser import text_string_to_metric_families

        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name
        )

    def wait_nodes(self, count: int, timeout: float = 30.0) -> str:
        """Poll /metrics until the agent knows ``count`` CiliumNodes and a reconcile pass has
        succeeded since; return that scrape. (The node gauge moves with the store, before the
        pass that applies it: a scrape taken then can lack the pass's own series.)"""
        import time

        deadline = time.monotonic() + timeout
        passes_at_count = None
        while True:
            text = self.scrape()
            if self.value(text, "nodecryptor_nodes") == count:
                ok = self.ok_passes(text)
                if passes_at_count is None:
                    passes_at_count = ok
                elif ok > passes_at_count:
                    return text
            else:
                passes_at_count = None
            assert time.monotonic() < deadline, (
                f"agent never saw {count} CiliumNodes and a successful pass after it"
            )
            time.sleep(0.1)

    @staticmethod
    def ok_passes(text: str) -> float:
        """Successful reconcile passes so far (0 before the first)."""
        from prometheus_client.parser import text_string_to_metric_families

        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "nodecryptor_reconciles_total" and s.labels.get("result") == "ok"
        )

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        self.fake.stop()


def families(text: str) -> dict[str, object]:
    """{family name: Metric} of an exposition, as prometheus_client parses it."""
    from prometheus_client.parser import text_string_to_metric_families

    return {fam.name: fam for fam in text_string_to_metric_families(text)}
