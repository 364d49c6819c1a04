"""Measure the agent image: its size, and the time from starting its container on a lab node to
the agent's /readyz answering 200, next to the same agent started from the development venv.
The README's image numbers come from this. Run as root from the repository root:

    .venv/bin/python tests/image/measure_image.py [--rounds N]

It builds the image first when it is missing or stale (scripts/build-image.sh), brings up a
three-node lab whose node w1 runs the image exactly as the image test does (image_lab.py), and
starts w1's agent N times each way, each time on a node without nodecryptor's pins (removed
first with `nodecryptor cleanup` from the image), as on a first install:

* container: the image under the DaemonSet's security context;
* venv: `python -m nodecryptor.cli run` inside the node, as root, no container.

(A restart with the previous agent's pins in place is not measured: under the DaemonSet's
capabilities it falls back to ip rules, see test_image.py's xfail.) Every start includes the BCC
compile of the program. Times are the median, minimum and maximum over the rounds, from the
start command to the first 200 of /readyz (polled every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import image_lab
from nodecryptor_testkit.lab.lab import Lab
from nodecryptor_testkit.lab.spec import make_spec

NODE = "w1"
NAME = f"nodecryptor-image-measure-{os.getpid()}"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} CPU {cpu}, kernel {platform.release()}"


def time_to_ready(lab: Lab, timeout: float = 120.0) -> float:
    started = time.monotonic()
    lab.start_agent(NODE)
    proc = lab.agents[NODE]
    while not lab.agent_ready(NODE):
        if proc.poll() is not None:
            raise RuntimeError(
                f"agent exited ({proc.returncode}):\n" + lab.log_tail(f"{NODE}-agent")
            )
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not ready after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


def cleanup_from_image(lab: Lab, scratch: Path) -> None:
    node = lab.nodes[NODE]
    run = image_lab.container_run(node, scratch)
    argv = [
        "nsenter",
        f"--net=/run/netns/{node.netns}",
        *image_lab.PODMAN_RUN,
        "--rm",
        *run.options,
        image_lab.IMAGE,
        "cleanup",
        "--bpffs=/sys/fs/bpf",
    ]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} s (min {min(values):.2f}, "
        f"max {max(values):.2f}, {len(values)} runs)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="N",
        help="starts per configuration (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")

    subprocess.run(["bash", str(image_lab.REPO / "scripts" / "build-image.sh")], check=True)
    inspect = json.loads(
        subprocess.run(
            ["podman", "image", "inspect", image_lab.IMAGE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )[0]
    archive = image_lab.REPO / "dist" / "nodecryptor-image.tar"

    scratch = Path(tempfile.mkdtemp(prefix="nodecryptor-image-measure-"))
    command = image_lab.agent_command(NAME, scratch)
    lab = Lab(make_spec(3), datapath="bpf", agent_commands={NODE: command})
    times: dict[str, list[float]] = {"container": [], "venv": []}
    try:
        lab.up()
        for _ in range(args.rounds):
            for what in times:
                lab.stop_agent(NODE)
                cleanup_from_image(lab, scratch)
                if what == "venv":
                    del lab.agent_commands[NODE]
                times[what].append(time_to_ready(lab))
                lab.agent_commands[NODE] = command
    finally:
        try:
            if lab.state is not None and NODE in lab.agents:
                lab.stop_agent(NODE)
        finally:
            lab.down()
            image_lab.remove_container(NAME)
            subprocess.run(["rm", "-rf", str(scratch)], check=False)

    print(f"machine: {machine()}")
    print(
        f"image {image_lab.IMAGE}: {inspect['Size'] / 1e6:.0f} MB unpacked, "
        f"{archive.stat().st_size / 1e6:.0f} MB as dist/{archive.name}"
    )
    for what, values in times.items():
        print(f"start to /readyz 200, {what}, node without pins: {summary(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
