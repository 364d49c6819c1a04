"""The compiled packet sender (``benchmarks/sender.c``), built with the machine's gcc at run
time into a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sender.c")


@dataclass(frozen=True)
class Sent:
    sent: int
    errors: int
    seconds: float
    cpu: float

    @property
    def pps(self) -> float:
        """Packets per second of wall-clock time."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def pps_cpu(self) -> float:
        """Packets per second of the sender's CPU time: the rate of one dedicated core."""
        return self.sent / self.cpu if self.cpu > 0 else 0.0


class Sender:
    def __init__(self):
        if shutil.which("gcc") is None:
            raise RuntimeError(
                "gcc not found: the packet sender is compiled at run time (apt-get install gcc)"
            )
        self._dir = tempfile.mkdtemp(prefix="nc-bench-sender-")
        self.path = os.path.join(self._dir, "sender")
        out = subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", self.path, SOURCE], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed:\n{out.stderr}")

    def run(self, ns: str, dst: str, seconds: float, port: int = 9) -> Sent:
        out = subprocess.run(
            ["ip", "netns", "exec", ns, self.path, dst, str(port), str(seconds)],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sender in {ns} to {dst} failed: {out.stderr.strip()}")
        fields = dict(part.split("=", 1) for part in out.stdout.split())
        return Sent(
            int(fields["sent"]),
            int(fields["errors"]),
            float(fields["seconds"]),
            float(fields["cpu"]),
        )

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
