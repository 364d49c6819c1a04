"""Numbers README.md states about the test suite are the suite's: a count that drifts fails here,
with the number to write."""

from __future__ import annotations

import pathlib
import re

import datapath_cases

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_packet_table_count_is_the_case_table_length():
    text = " ".join(README.read_text().split())  # the sentence may wrap
    stated = re.findall(r"a table of (\d+) crafted packets", text)
    assert stated, "README.md no longer states the packet table's size; update this test"
    assert [int(n) for n in stated] == [len(datapath_cases.CASES)] * len(stated), (
        f"README.md says {stated} crafted packets; tests/datapath_cases.py has "
        f"{len(datapath_cases.CASES)}"
    )
