"""What the numbers were measured on: recorded with every result, since a 2-core VM shared with
other work gives numbers that only mean something next to their load average."""

from __future__ import annotations

import os
import platform
import subprocess
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def _gcc_version() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _irq_time_accounting() -> str:
    """Whether softirq time is charged to the interrupted task (the datapath benchmark's rate
    per CPU-second relies on it): "off" (charged, as here), "on", or "unknown"."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith("CONFIG_IRQ_TIME_ACCOUNTING=y"):
                    return "on"
        return "off"
    except OSError:
        return "unknown"


def describe() -> dict:
    """The machine at the start of a run; ``finish`` adds the load at the end."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count() or 0,
        "kernel": platform.release(),
        "memory_mb": _mem_total_mb(),
        "python": platform.python_version(),
        "gcc": _gcc_version(),
        "irq_time_accounting": _irq_time_accounting(),
        "hostname": platform.node(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }


def finish(machine: dict) -> dict:
    machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return machine


def line(machine: dict) -> str:
    """One line for tables and documents."""
    text = (
        f"{machine['cpu_model']}, {machine['cpus']} CPUs, {machine['memory_mb'] / 1024:.0f} "
        f"GiB, Linux {machine['kernel']}, Python {machine['python']}; load average "
        f"{' '.join(f'{x:.2f}' for x in machine['load_start'])} at start"
    )
    if "load_end" in machine:
        text += f", {' '.join(f'{x:.2f}' for x in machine['load_end'])} at end"
    return text
