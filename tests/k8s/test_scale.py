"""Scale: 5,000 CiliumNodes listed in pages of 500 and synced into the store in a few seconds
(measured on the 2-vCPU test VM: 0.46 s idle, 1.3 s at load average 8 while others ran
tests; the bound is generous for slower machines)."""

from __future__ import annotations

import time

from nodecryptor_testkit.fakeapi import FakeApiServer
from nodecryptor_testkit.wait import wait_for

from k8s_support import TOKEN, node, with_settings
from k8s_support import fake, kubeconfig, run_sync, settings  # noqa: F401 - pytest fixtures

NODES = 5000
BOUND_SECONDS = 15.0


def test_5000_ciliumnodes_list_and_sync(settings, run_sync, tmp_path):
    with FakeApiServer(token=TOKEN, objects=[node(i) for i in range(NODES)]) as big:
        s = with_settings(
            settings, list_page_size=500, kubeconfig=big.write_kubeconfig(str(tmp_path / "big"))
        )
        started = time.perf_counter()
        r = run_sync(s)
        elapsed = time.perf_counter() - started
        print(f"\nlist+sync of {NODES} CiliumNodes: {elapsed:.2f}s")
        assert len(r.store) == NODES
        assert elapsed < BOUND_SECONDS
        big.apply(node(NODES))
        wait_for(lambda: len(r.store) == NODES + 1, 5, "the watch to add one more node")
        r.halt()
