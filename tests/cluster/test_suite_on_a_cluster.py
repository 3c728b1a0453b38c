"""The end-to-end suite once more, against three nodes of a cluster with every connection
sent to a random node (``RUNCAST_TEST_CLUSTER=1``: tests/conftest.py's ``server``).

It runs unchanged: what a client sees of one node holds across nodes (PROTOCOL.md §9).
Only the tests marked ``one_node`` are left out: they drive one node's manager in their
own process, which a connection to a random node does not reach.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = [
    "tests/test_smoke.py",
    "tests/transport/test_session.py",
    "tests/transport/test_http.py",
    "tests/transport/test_threads.py",
    "tests/transport/test_records.py",
    "tests/transport/test_sse.py",
    "tests/transport/test_deleting.py",
]


@pytest.mark.timeout(600)
def test_the_end_to_end_suite_passes_on_a_cluster_of_three() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not one_node",
            *SUITE,
        ],
        cwd=ROOT,
        env={**os.environ, "RUNCAST_TEST_CLUSTER": "1"},
        capture_output=True,
        text=True,
        timeout=580,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
