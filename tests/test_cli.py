"""The ``acb`` command line: help, version, one-line errors, generate, batch, and serve with the openai client.

Parsing and errors run in-process (``acb.cli.main``); what needs a real terminal or a real server runs the command."""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import time

import pytest

from acb.cli import build_parser, main, printable
from acb.sampling_params import MAX_GRAMMAR_CHARS

ACB = [sys.executable, "-m", "acb.cli"]


def _run(*args, input=None, stdin=None, timeout=120, env=None):
    return subprocess.run(
        [*ACB, *args], input=input, stdin=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize("command", [[], ["generate"], ["serve"], ["batch"]])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    parser = build_parser()
    if command:
        parser = next(a for a in parser._actions if a.dest == "command").choices[command[0]]
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in out
        if action.help and action.option_strings and action.help != "==SUPPRESS==":
            assert action.help.split("(")[0].split("%")[0].strip()[:20] in out


def test_version(capsys):
    from acb import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"acb {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--temperature", "-1", "--device", "cpu"],
        ["generate", "--model", "./no/such/model"],
        ["generate", "--max-new-tokens", "many"],
        ["frobnicate"],
        ["batch", "--input", "/no/such/file.jsonl", "--device", "cpu"],
        ["generate", "--dtype", "int8", "--device", "cpu"],
        ["generate", "--json-schema", "/no/such/schema.json", "--device", "cpu"],
        ["generate", "--regex", "(unclosed", "--device", "cpu"],
        ["generate", "--presence-penalty", "9", "--device", "cpu"],
        ["generate", "--regex", "a", "--json-object"],
        ["generate", "--prefill-chunk-tokens", "0", "--device", "cpu"],
        ["batch", "--admission-order", "shortest_first", "--device", "cpu"],
        ["serve", "--stream-interval", "0"],
        ["serve", "--api-processes", "-1"],
        ["serve", "--timeout-keep-alive", "0"],
        ["serve", "--timeout-keep-alive", "soon"],
        ["serve", "--timeout-keep-alive", "nan"],
        ["serve", "--timeout-keep-alive", "-1"],
        # each refused before a model loads (70000 was bound as 4464 on uvloop; a concurrency of 0 hung)
        ["serve", "--port", "70000"],
        ["serve", "--port", "-1"],
        ["serve", "--max-body-bytes", "0"],
        ["serve", "--api-processes", "100000"],
        ["batch", "--concurrency", "0"],
    ],
)
def test_errors_are_one_clear_line(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # usage errors, from argparse
        code = exc.code
    assert code in (1, 2)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and "Traceback" not in err
    if "--timeout-keep-alive" in args:  # argparse's own check, not "unrecognized arguments"
        assert "--timeout-keep-alive" in lines[0], err


def test_a_cuda_device_without_cuda_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA" in err


def test_model_text_cannot_steer_a_terminal():
    assert printable("ok\x1b[2J\x07\x9b31m\ttab\nline\r") == "ok\\x1b[2J\\x07\\x9b31m\ttab\nline\r"


def test_generate_with_no_arguments_streams_text():
    r = _run("generate", "--device", "cpu", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "[finish: length]" in r.stderr


def test_generate_over_two_processes_prints_what_one_prints():
    """``--tensor-parallel-size 2`` (gloo on the CPU): the same greedy text as one process, no worker left."""
    args = ("generate", "--device", "cpu", "--max-new-tokens", "12", "--temperature", "0", "hello there")
    one, two = _run(*args), _run(*args, "--tensor-parallel-size", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()


def test_batch_keeps_order_reports_every_line_and_fails_if_a_line_did(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = ['"first"', '{"prompt": "second", "id": "b", "max_new_tokens": 3}', "not json", '{"prompt": ""}', '"last"']
    src.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "out.jsonl"
    code = main(["batch", "-i", str(src), "-o", str(dst), "--device", "cpu", "--max-new-tokens", "4", "--no-progress"])
    assert code == 1  # two lines failed: the exit status says so; every line is still written
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["index"] for o in out] == [0, 1, 2, 3, 4]
    assert [("error" in o) for o in out] == [False, False, True, True, False]
    assert out[1]["id"] == "b" and len(out[1]["token_ids"]) == 3
    assert len(out[0]["token_ids"]) <= 4 and out[0]["finish_reason"] in ("length", "stop")
    # longest first: lines still come out in input order, each with its own length
    src.write_text('{"prompt": "a", "max_new_tokens": 2}\n{"prompt": "b", "max_new_tokens": 5}\n"c"\n')
    assert main(["batch", "-i", str(src), "-o", str(dst), "--device", "cpu", "--max-new-tokens", "3",
                 "--no-progress", "--admission-order", "longest_first"]) == 0  # fmt: skip
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["index"] for o in out] == [0, 1, 2] and all(len(o["token_ids"]) <= n for o, n in zip(out, (2, 5, 3)))


def test_batch_with_no_arguments_runs_demo_prompts():
    master, slave = pty.openpty()  # a terminal on stdin: no input given, so the demo prompts run
    try:
        r = _run("batch", "--device", "cpu", "--no-progress", "--max-new-tokens", "4", stdin=slave)
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


def _wait_up(proc, port: int) -> None:
    import httpx

    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.3)


def test_serve_with_the_openai_client_an_api_key_and_a_quiet_health_probe():
    import httpx
    from openai import AuthenticationError, OpenAI

    port = _free_port()
    env = {**os.environ, "ACB_API_KEY": "s3cret"}
    proc = subprocess.Popen(
        [*ACB, "serve", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _wait_up(proc, port)
        for _ in range(3):
            assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret", max_retries=0)
        model = client.models.list().data[0].id
        assert client.models.retrieve(model).id == model
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=10, stream=True
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert len(chunks) >= 3 and text
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    start = err.index("acb: model ")  # the start-up summary, then the announcement once the socket is bound
    assert "KV cache" in err[start:] and "max_model_len" in err[start:]
    assert err.index("acb: serving on http://127.0.0.1:") > start
    assert "GET /health" not in out + err
    assert "GET /v1/models HTTP" in out  # uvicorn's access log: everything else is still there


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts child processes through /proc")
def test_serve_in_api_processes_answers_and_leaves_nothing_running():
    """``--api-processes 2``: the OpenAI client's requests, concurrent, over both processes; SIGTERM ends the API
    processes and the engine's, nothing left behind."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    port = _free_port()
    proc = subprocess.Popen(
        [*ACB, "serve", "--port", str(port), "--device", "cpu", "--api-processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_up(proc, port)
        workers = _children(proc.pid)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id

        def ask(i: int) -> str:
            r = client.completions.create(model=model, prompt=f"number {i}", max_tokens=6, temperature=0)
            return r.choices[0].text

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, range(16)))
        assert texts == [ask(i) for i in range(16)]  # greedy: the same answer whichever process served it
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
        )
        assert list(stream)[-1].choices[0].finish_reason in ("length", "stop")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "in 2 API processes" in err and len(workers) >= 2
    deadline = time.time() + 10  # orphans are reaped by init shortly after
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "an API process outlived the server"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts child processes through /proc")
def test_api_processes_end_with_a_killed_engine_process():
    """The engine's process is SIGKILLed (the OOM killer, say): its API processes end too, instead of keeping the
    port and answering 503 for ever."""
    port = _free_port()
    proc = subprocess.Popen([*ACB, "serve", "--port", str(port), "--device", "cpu", "--api-processes", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        _wait_up(proc, port)
        workers = _children(proc.pid)
    finally:
        proc.kill()
        proc.wait(30)
    assert workers
    deadline = time.time() + 20
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"API processes {left} outlived the engine's process"


@pytest.mark.parametrize("processes", ["0", "2"])
def test_serve_says_it_cannot_bind_instead_of_announcing(processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _run("serve", "--port", str(port), "--device", "cpu", "--api-processes", processes, timeout=90)
    assert r.returncode == 1
    assert "serving on" not in r.stderr and "could not serve" in r.stderr.splitlines()[-1]


def test_generate_and_batch_take_constraints_and_penalties(tmp_path, capsys):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                  "maximum": 9}}, "required": ["n"], "additionalProperties": False}))  # fmt: skip
    assert main(["generate", "x", "--device", "cpu", "--json-schema", str(schema), "--max-new-tokens", "40"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["n"] in range(10)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([
        json.dumps({"prompt": "a", "regex": "[xyz]{3}", "max_new_tokens": 10}),
        json.dumps({"prompt": "b", "presence_penalty": 1.5, "logit_bias": {"5": 100}, "max_new_tokens": 3,
                    "ignore_eos": True}),
        json.dumps({"prompt": "c", "frequency_penalty": 7}),
    ]) + "\n")  # fmt: skip
    code = main(["batch", "-i", str(src), "-o", str(dst), "--device", "cpu", "--no-progress"])
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert code == 1 and "error" in out[2] and "frequency_penalty" in out[2]["error"]["message"]
    assert len(out[0]["text"]) == 3 and set(out[0]["text"]) <= set("xyz")
    assert out[1]["token_ids"] == [5, 5, 5]  # a bias of 100 wins over any penalty in [-2, 2]


@pytest.mark.parametrize("api_processes", [0, 1], ids=["one process", "api processes"])
def test_sigterm_drains_then_ends_a_stream_with_an_error_event_and_refuses_new_connections(api_processes):
    """SIGTERM while a stream runs, in one process and with API processes alike: the stream runs on through the
    drain (``--drain-timeout``), then ends with an error event and ``[DONE]`` (not a cut connection); a request
    during the drain is refused at once (not accepted and left hanging); the server exits cleanly."""
    import signal
    import threading

    import httpx

    port = _free_port()
    extra = ["--api-processes", str(api_processes)] if api_processes else []
    proc = subprocess.Popen([*ACB, "serve", "--port", str(port), "--device", "cpu", "--log-level", "warning",
                             "--drain-timeout", "2", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    late: dict = {}

    def during_the_drain():
        time.sleep(0.5)
        t0 = time.monotonic()
        try:
            late["status"] = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
        except httpx.HTTPError as exc:
            late["status"] = type(exc).__name__
        late["s"] = time.monotonic() - t0

    try:
        _wait_up(proc, port)
        body = {"prompt": "a", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            thread = threading.Thread(target=during_the_drain)
            thread.start()
            events = [line for line in lines if line.startswith("data: ")]  # raises if the connection is cut
            took = time.monotonic() - t0
        thread.join()
        assert proc.wait(30) in (0, -signal.SIGTERM)  # in one process uvicorn re-raises the signal it handled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2], events[-3:]
    assert 1.5 < took < 5, took  # it ran through the drain, then ended
    assert late["status"] in ("ConnectError", 503) and late["s"] < 1.5, late


def test_an_empty_constraint_file_is_refused_and_a_huge_one_is_not_read_whole(tmp_path, capsys):
    """An empty --grammar or --json-schema file is refused (it was silently ignored: the output ran unconstrained),
    and a file is read no further than the longest constraint SamplingParams takes (/dev/zero once ran the process
    out of memory)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for flag in ("--grammar", "--json-schema"):
        assert main(["generate", "x", "--device", "cpu", flag, str(empty)]) == 1
        err = capsys.readouterr().err
        assert flag.lstrip("-").replace("-", "_") in err and "Traceback" not in err, err
    if os.path.exists("/dev/zero"):
        for flag in ("--grammar", "--json-schema"):
            with pytest.raises(SystemExit):
                main(["generate", "x", "--device", "cpu", flag, "/dev/zero"])
            assert "longer than" in capsys.readouterr().err
    # an indented schema longer than the limit whose compact JSON is within it is read whole
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1500)}}
    indented = tmp_path / "schema.json"
    indented.write_text(json.dumps(schema, indent=8))
    assert len(indented.read_text()) > MAX_GRAMMAR_CHARS > len(json.dumps(schema, separators=(",", ":")))
    assert main(["generate", "x", "--device", "cpu", "--json-schema", str(indented), "--max-new-tokens", "3"]) == 0


def test_batch_writes_the_logprobs_a_line_asks_for_and_refuses_unknown_fields(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([
        json.dumps({"prompt": "a", "max_new_tokens": 3, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}),
        json.dumps({"prompt": "b", "max_tokens": 2, "temprature": 0.5}),  # OpenAI's name, and a misspelling
        json.dumps({"prompt": "c", "max_new_tokens": 2}),
    ]) + "\n")  # fmt: skip
    assert main(["batch", "-i", str(src), "-o", str(dst), "--device", "cpu", "--no-progress"]) == 1
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out[0]["logprobs"]) == 3 and all(p <= 0 for p in out[0]["logprobs"])
    assert [len(alts) for alts in out[0]["top_logprobs"]] == [2, 2, 2]
    assert out[1]["error"]["type"] == "ValueError" and "temprature" in out[1]["error"]["message"]
    assert "logprobs" not in out[2] and "top_logprobs" not in out[2]
