"""Every example runs as is on the embedded default model."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("quickstart.py", [], "[finish_reason=length]"),
        ("embed_in_app.py", [], "slow: timed out"),
        ("batch_job.py", ["--n", "300"], "300 prompts, 2400 tokens"),
        ("openai_server.py", [], "completion:"),
        ("fastapi_app.py", [], "bad: 400 {'error': 'the prompt is empty', 'param': 'prompt'}"),
        ("structured_output.py", [], "sample 2:"),
        ("tensor_parallel.py", [], "same tokens as one process: True"),
    ],
)
def test_example_runs(script, args, expect):
    r = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert expect in r.stdout
    if script == "embed_in_app.py":  # the timed-out request freed its blocks
        free, total = r.stdout.split("KV blocks free after all jobs: ")[1].split()[0].split("/")
        assert free == total
