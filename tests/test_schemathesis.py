"""Schemathesis against a live server over its own OpenAPI document: generated requests,
valid and invalid, to every operation, then sequences of them that reuse what earlier
answers created; no answer is a 5xx, and every answer has a status, a content type,
headers and a body that the document declares for its operation.

The server runs in this test's event loop; schemathesis runs as a subprocess (its CLI),
so waiting for it leaves the loop free to serve. The number of examples is bounded and
the seed fixed, so a run takes well under a minute and a failure reproduces. For a
deeper search: ``RUNCAST_SCHEMATHESIS_EXAMPLES=200 RUNCAST_SCHEMATHESIS_SEED=7``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server

SECRET = "admin-secret-0123456789"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
MAX_EXAMPLES = int(os.environ.get("RUNCAST_SCHEMATHESIS_EXAMPLES", "15"))
SEED = int(os.environ.get("RUNCAST_SCHEMATHESIS_SEED", "20260101"))
TIMEOUT_S = 100 if MAX_EXAMPLES <= 15 else 600


@pytest.mark.timeout(TIMEOUT_S + 20)
async def test_schemathesis_finds_no_5xx_and_no_answer_off_its_schema(
    server_factory: Any, tmp_path: Path
) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st is not None, "schemathesis is a dev dependency: pip install -e '.[dev]'"
    # Token mode, so that the document's security is exercised; a rate that generated
    # requests never reach.
    server: Server = await server_factory(
        tokens=(f"admin:{SECRET}",), rate=1_000_000.0, rate_burst=1_000_000
    )
    command = [
        st,
        "run",
        f"{server.http_url}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {SECRET}",
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        # One worker: the server shares this machine, and a failure replays in order.
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-20_000:]
    passed = re.search(r"\d+ generated, (\d+) passed", text)
    assert passed is not None and int(passed[1]) > 0, text[-5_000:]
