"""The whole repository of the tiny llama served by a real tritonserver: ensemble, BLS, reference runtime.

Streamed text (ensemble with a request id, BLS, HTTP generate_stream) against the non-streamed text, bad
requests through the ensemble and the BLS, cancellation of a BLS stream, and `enginesmith serve`: stopping
on SIGTERM with no process left behind, taking its server along when killed, refusing a taken port.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml

from tests.support import REPO_ROOT, convert_tiny, tiny_hf_model
from tests.test_server import array_input, bytes_input
from enginesmith.triton_repo.server import TritonServer, free_endpoints

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]
PROMPTS = ["Hello world!", "Unicode: café, naïve, 東京", "The quick brown fox"]


# ---- the whole repository of the tiny llama ----------------------------------------------------------------
def tiny_layout(root: Path, name: str) -> Path:
    """<root>/out/<name>/{checkpoint, engine} (what convert + build make) and the recipe file."""
    from enginesmith.builders.mapping import Mapping

    stage = root / "out" / name
    ckpt = convert_tiny(stage, "llama", Mapping.create(1, 1))
    ckpt.rename(stage / "checkpoint")
    tok = stage / "checkpoint" / "tokenizer"
    tok.mkdir(exist_ok=True)
    for f in tiny_hf_model("llama").glob("tokenizer*"):
        if not (tok / f.name).exists():
            shutil.copy(f, tok / f.name)
    (stage / "engine").mkdir()
    (stage / "engine" / "engine_config.json").write_text(json.dumps(dict(  # what `build` writes for `reference`
        target="reference", checkpoint_dir=str(stage / "checkpoint"), max_batch_size=16, max_input_len=256,
        max_seq_len=512, max_num_tokens=1024, max_beam_width=1, tokens_per_block=16, dtype="float32")))
    data = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-llama.yaml").read_text())
    ep = free_endpoints()
    data.update(name=name)
    data["model"]["source"] = str(tiny_hf_model("llama"))
    data["serve"].update(http_port=ep.http_port, grpc_port=ep.grpc_port, metrics_port=ep.metrics_port)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return root / f"{name}.yaml"


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe
    from enginesmith.triton_repo.repository import write_repo

    root = tmp_path_factory.mktemp("llm-server")
    recipe_path = tiny_layout(root, "tiny-serve")
    recipe = load_recipe(recipe_path)
    stage = root / "out" / recipe.name
    write_repo(recipe, make_plan(recipe, with_options=False), stage / "engine", stage / "checkpoint" / "tokenizer",
               stage / "repo")
    with TritonServer(stage / "repo", log_path=root / "server.log") as server:
        yield server, recipe_path


def grpc_stream(url: str, model: str, text: str, max_tokens: int, request_id: str) -> list[str]:
    import tritonclient.grpc as grpc

    events: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    inputs = [bytes_input(grpc, "text_input", [[text]]),
              array_input(grpc, "max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
              array_input(grpc, "stream", np.array([[True]]), "BOOL")]
    client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
    chunks = []
    try:
        while True:
            result, error = events.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            if any(o.name == "text_output" for o in response.outputs):
                chunks.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            if response.parameters.get("triton_final_response") and \
                    response.parameters["triton_final_response"].bool_param:
                return chunks
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_text_equals_the_whole_text(llm_server, prompt):
    server, _ = llm_server
    whole = httpx.post(f"{server.http_url}/v2/models/ensemble/generate",
                       json={"text_input": prompt, "max_tokens": 24}, timeout=120)
    assert whole.status_code == 200, whole.text
    text = whole.json()["text_output"]
    ensemble = grpc_stream(server.grpc_url, "ensemble", prompt, 24, request_id=f"e-{prompt}")
    bls = grpc_stream(server.grpc_url, "tensorrt_llm_bls", prompt, 24, request_id="")
    assert len([c for c in ensemble if c]) > 1  # really streamed, chunk by chunk
    assert "".join(bls) == text
    # The ensemble never learns that a stream ended, so a character left incomplete by the last token
    # (U+FFFD in the whole text) is held back for good; everything before it is identical.
    streamed = "".join(ensemble)
    assert text.startswith(streamed) and set(text[len(streamed):]) <= {"\ufffd"}
    sse = httpx.post(f"{server.http_url}/v2/models/tensorrt_llm_bls/generate_stream",
                     json={"text_input": prompt, "max_tokens": 24, "stream": True}, timeout=120)
    events = [json.loads(line[5:]) for line in sse.text.splitlines() if line.startswith("data:")]
    assert "".join(e.get("text_output", "") for e in events) == text


def test_ensemble_errors_keep_the_server_serving(llm_server):
    server, _ = llm_server
    bad = httpx.post(f"{server.http_url}/v2/models/ensemble/generate", json={"text_input": "", "max_tokens": 4},
                     timeout=60)
    assert bad.status_code == 400 and "QUERY (text_input) row 0 is empty" in bad.json()["error"]
    bad = httpx.post(f"{server.http_url}/v2/models/tensorrt_llm_bls/generate",
                     json={"text_input": "hi", "max_tokens": -1}, timeout=60)
    assert bad.status_code == 400 and "row 0 is -1, outside [1, 2147483647]" in bad.json()["error"]
    ok = httpx.post(f"{server.http_url}/v2/models/ensemble/generate", json={"text_input": "hi", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200 and "text_output" in ok.json()


def recipe_on_ports(recipe_path: Path, tmp_path: Path, ep) -> Path:
    """The served recipe again, on other ports."""
    data = yaml.safe_load(recipe_path.read_text())
    data["serve"].update(http_port=ep.http_port, grpc_port=ep.grpc_port, metrics_port=ep.metrics_port)
    recipe = tmp_path / "tiny-serve.yaml"
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def start_serve(recipe: Path, out: Path, ep) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`enginesmith serve` in a subprocess, once its server is ready; the processes it runs."""
    cmd = [sys.executable, "-m", "enginesmith.builders.cli", "serve", str(recipe), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{ep.http_port}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert any("tritonserver" in " ".join(p.cmdline()) for p in family)
    assert any("triton_python_backend_stub" in " ".join(p.cmdline()) for p in family)
    return proc, family


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_serve_command_stops_on_sigterm(llm_server, tmp_path):
    _, recipe_path = llm_server
    ep = free_endpoints()
    proc, family = start_serve(recipe_on_ports(recipe_path, tmp_path, ep), recipe_path.parent / "out", ep)
    try:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "tritonserver stopped" in output
    assert not running(family)


def test_serve_killed_takes_its_server_along(llm_server, tmp_path):
    """SIGKILL gives `serve` no chance to stop anything: tritonserver and its stubs used to stay on the ports."""
    from enginesmith.triton_repo.ports import port_taken

    _, recipe_path = llm_server
    ep = free_endpoints()
    proc, family = start_serve(recipe_on_ports(recipe_path, tmp_path, ep), recipe_path.parent / "out", ep)
    server = family[1:]
    try:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20  # tritonserver stops gracefully: --exit-timeout-secs=5, then it exits
        while running(server) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not running(server), [p.cmdline() for p in running(server)]
        assert not any(port_taken("127.0.0.1", port) for port in (ep.http_port, ep.grpc_port, ep.metrics_port))
    finally:
        for p in running(server):
            p.kill()


def test_serve_refuses_a_taken_port_naming_its_holder(llm_server, tmp_path):
    """It used to print "serving ..." (the old server answered the health check) and fail 15 s later."""
    from typer.testing import CliRunner

    from enginesmith.builders.cli import app

    _, recipe_path = llm_server
    script = tmp_path / "holder.py"
    script.write_text("import socket, sys, time\ns = socket.socket()\ns.bind(('127.0.0.1', int(sys.argv[1])))\n"
                      "s.listen()\nprint('listening', flush=True)\ntime.sleep(120)\n")
    ep = free_endpoints()
    holder = subprocess.Popen([sys.executable, str(script), str(ep.metrics_port)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "listening\n"
        r = CliRunner().invoke(app, ["serve", str(recipe_on_ports(recipe_path, tmp_path, ep)),
                                     "--out", str(recipe_path.parent / "out")])
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code == 2, r.output
    out = r.stdout.splitlines()
    assert len(out) == 1 and out[0].startswith("readiness timeout "), r.stdout  # the wait it chose; no "serving ..."
    assert r.stderr == (f"error: metrics port {ep.metrics_port} on 127.0.0.1 is in use by pid {holder.pid} "
                        f"({sys.executable} {script} {ep.metrics_port}): stop that process or choose another port "
                        "(serve.metrics_port in the recipe)\n")


def metric_values(metrics_url: str, family: str, label: str | None = None) -> dict[str, float]:
    """{label value (or ""): value} of one Prometheus family served by the reference runtime."""
    out = {}
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        m = re.match(rf'{family}\{{(.*)\}} (\S+)$', line)
        if m:
            key = re.search(rf'{label}="(\w+)"', m.group(1)).group(1) if label else ""
            out[key] = float(m.group(2))
    return out


def test_cancelled_bls_stream_stops_generation(llm_server):
    """Cancelling a BLS stream sends upstream's stop request: generation ends early, KV blocks are freed."""
    import tritonclient.grpc as grpc

    server, _ = llm_server
    tokens_before = metric_values(server.metrics_url, "nv_trt_llm_output_tokens_total").get("", 0)
    events: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    inputs = [bytes_input(grpc, "text_input", [["Once upon a time"]]),
              array_input(grpc, "max_tokens", np.array([[480]], dtype=np.int32), "INT32"),
              array_input(grpc, "stream", np.array([[True]]), "BOOL")]
    client.async_stream_infer("tensorrt_llm_bls", inputs, enable_empty_final_response=True)
    for _ in range(3):  # generation is under way
        result, error = events.get(timeout=120)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + 60
    blocks = "nv_trt_llm_kv_cache_block_metrics"
    while metric_values(server.metrics_url, blocks, "kv_cache_block_type").get("used", 1) > 0:
        assert time.monotonic() < deadline, "the cancelled sequence kept its KV blocks"
        time.sleep(0.5)
    generated = metric_values(server.metrics_url, "nv_trt_llm_output_tokens_total")[""] - tokens_before
    assert 3 <= generated < 480  # stopped early, not run to max_tokens
    ok = httpx.post(f"{server.http_url}/v2/models/tensorrt_llm_bls/generate",
                    json={"text_input": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text
