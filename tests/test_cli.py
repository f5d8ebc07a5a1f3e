"""The ``acb`` command line: help, one-line errors, generate, batch, and serve with the openai client."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import time

import pytest

ACB = [sys.executable, "-m", "acb.cli"]


def _run(*args, input=None, stdin=None, timeout=120):
    return subprocess.run([*ACB, *args], input=input, stdin=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["generate"], ["serve"], ["batch"]])
def test_help_documents_every_option(command):
    from acb.cli import build_parser

    r = _run(*command, "--help")
    assert r.returncode == 0
    parser = build_parser()
    if command:
        parser = parser._subparsers._group_actions[0].choices[command[0]]
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in r.stdout
        if action.help and action.option_strings:
            assert action.help.split("(")[0].split("%")[0].strip()[:20] in " ".join(r.stdout.split())


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--temperature", "-1", "--device", "cpu"],
        ["generate", "--model", "./no/such/model"],
        ["generate", "--max-new-tokens", "many"],
        ["frobnicate"],
        ["batch", "--input", "/no/such/file.jsonl", "--device", "cpu"],
    ],
)
def test_errors_are_one_clear_line(args):
    r = _run(*args)
    assert r.returncode in (1, 2)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "error" in lines[0] and "Traceback" not in r.stderr


def test_generate_with_no_arguments_streams_text():
    r = _run("generate", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "[finish: length]" in r.stderr


def test_batch_keeps_order_and_reports_every_line(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = ['"first"', '{"prompt": "second", "id": "b", "max_new_tokens": 3}', "not json", '{"prompt": ""}', '"last"']
    src.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "out.jsonl"
    r = _run("batch", "-i", str(src), "-o", str(dst), "--device", "cpu", "--max-new-tokens", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["index"] for o in out] == [0, 1, 2, 3, 4]
    assert [("error" in o) for o in out] == [False, False, True, True, False]
    assert out[1]["id"] == "b" and len(out[1]["token_ids"]) == 3
    assert len(out[0]["token_ids"]) <= 4 and out[0]["finish_reason"] in ("length", "stop")
    assert "3 completed, 2 failed" in r.stderr


def test_batch_with_no_arguments_runs_demo_prompts():
    master, slave = pty.openpty()  # a terminal on stdin: no input given, so the demo prompts run
    try:
        r = _run("batch", "--device", "cpu", "--no-progress", stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 64
    assert "64 completed, 0 failed" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_the_openai_client_streams_a_chat_completion():
    import httpx
    from openai import OpenAI

    port = _free_port()
    proc = subprocess.Popen(
        [*ACB, "serve", "--port", str(port), "--device", "cpu", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert len(chunks) >= 3 and text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
