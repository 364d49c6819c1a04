"""Summarise a py-spy speedscope profile of the agent (``suite.py --profile-dir DIR``): the
functions holding the most busy samples, inclusive and self. The suite records with
``--gil`` (only samples holding the GIL); samples whose innermost frame is a wait (select, a
condition or event wait, a socket read, sleep) are left out too, so the shares are of the time
the agent was actually computing.

    .venv/bin/python benchmarks/profile_top.py DIR/agent-bpf-10000.speedscope.json [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

IDLE = ("select", "wait", "readinto", "sleep", "accept", "recv", "poll", "_wait_for_tstate_lock")


def summarise(path: str, top: int) -> str:
    with open(path) as f:
        doc = json.load(f)
    frames = doc["shared"]["frames"]

    def name(i: int) -> str:
        fr = frames[i]
        return f"{fr['name']} ({fr.get('file', '?').rsplit('/', 1)[-1]}:{fr.get('line', '?')})"

    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    busy = idle = 0.0
    for profile in doc["profiles"]:
        for sample, weight in zip(profile["samples"], profile["weights"]):
            if not sample or any(w in frames[sample[-1]]["name"] for w in IDLE):
                idle += weight
                continue
            busy += weight
            for key in {name(i) for i in sample}:
                inclusive[key] += weight
            own[name(sample[-1])] += weight
    lines = [f"{path}: {busy:.1f} s busy, {idle:.1f} s idle (all threads)", "inclusive:"]
    lines += [f"  {100 * v / busy:5.1f}%  {k}" for k, v in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {100 * v / busy:5.1f}%  {k}" for k, v in own.most_common(max(5, top // 2))]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top {args.top}: expected a positive count")
    print(summarise(args.profile, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
