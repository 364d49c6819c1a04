"""Compile and load bpf/nodecryptor.c in the guest and nothing else (no lab, no traffic).

A quick check that the 6.1 verifier accepts the program, one VM boot (~1-2 min under TCG
instead of a whole scenario): ``python vm-tests/harness.py --load-only``. Prints one JSON line
(``ok``, ``kernel``, ``seconds``, ``verified_insns`` per entry point, or ``error``); on a
rejection BCC has already written the verifier log to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from nodecryptor.datapath.bpf import program, syscall
from nodecryptor.core.settings import Settings


def main() -> int:
    started = time.monotonic()
    result: dict = {"kernel": os.uname().release}
    try:
        loaded = program.load(Settings())
    except Exception as e:  # reported, the exit status says it failed
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    else:
        result.update(
            ok=True,
            verified_insns={
                "nc_egress": syscall.prog_verified_insns(loaded.prog_fd),
                "nc_explain": syscall.prog_verified_insns(loaded.explain_fd),
                "nc_ingress": syscall.prog_verified_insns(loaded.ingress_fd),
                "nc_explain_ingress": syscall.prog_verified_insns(loaded.explain_ingress_fd),
            },
        )
        loaded.close()
    result["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
