"""The OpenAI front against the real served tiny model: the official `openai` client and plain curl, greedy
text equal to the Triton paths', streaming and not, chat and completions, errors, cancellation when the
client goes away, `serve --openai-port`, and the bench's openai backend."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml
from typer.testing import CliRunner

from enginesmith.builders.cli import app
from enginesmith.client.bench_report import load_runs
from enginesmith.client.grpc_stream import GrpcStreamClient
from enginesmith.client.http import HttpClient
from enginesmith.client.params import GenerateParams
from enginesmith.client.server_stats import metric_total, metrics_sample
from tests.client_served import MAX_BATCH
from tests.served_processes import engine_holder, paused
from tests.support import REPO_ROOT, tiny_hf_model

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]
PROMPT = "The quick brown fox jumps over the lazy dog."
MODEL = "tiny-llama"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LONG = 400  # output tokens of a request that is cancelled long before it ends


def recipe_yaml(path, grpc_port: int):
    data = yaml.safe_load((REPO_ROOT / "recipes" / "tiny-llama.yaml").read_text())
    data["model"]["source"] = str(tiny_hf_model("llama"))
    data["build"]["max_batch_size"] = data["serve"]["triton_max_batch_size"] = MAX_BATCH
    data["serve"]["grpc_port"] = grpc_port
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def chat_tok(served, tmp_path_factory):
    """The served tokenizer plus a chat template (the tiny model's has none)."""
    from enginesmith.client.tokenizer import load_tokenizer

    t = load_tokenizer(served.tokenizer_dir)
    t.chat_template = TEMPLATE
    d = tmp_path_factory.mktemp("chat-tokenizer")
    t.save_pretrained(str(d))
    t.path = d
    return t


@pytest.fixture(scope="module")
def front(served, chat_tok, tmp_path_factory):
    """`enginesmith openai RECIPE` as a child process, fronting the served Triton."""
    from enginesmith.triton_repo.openai_api.runner import FrontProcess

    root = tmp_path_factory.mktemp("openai-front")
    recipe = recipe_yaml(root / "tiny.yaml", int(served.grpc_url.rsplit(":", 1)[1]))
    with FrontProcess(recipe, out=root / "out", tokenizer=chat_tok.path, log_path=root / "front.log") as f:
        yield f.url


@pytest.fixture(scope="module")
def oai(front):
    with openai.OpenAI(base_url=front, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def plain_front(served):
    """The front in a thread of this process, over the served tokenizer as it is (no chat template)."""
    from enginesmith.triton_repo.openai_api.app import FrontConfig, create_app
    from enginesmith.triton_repo.openai_api.prompts import Limits
    from enginesmith.triton_repo.openai_api.runner import FrontServer

    cfg = FrontConfig(MODEL, served.grpc_url, served.tokenizer_dir, Limits(256, 512))
    server = FrontServer(create_app(cfg), "127.0.0.1", 0).start()
    yield server.url
    server.stop()


def triton_text(served, tok, n: int, **kw):
    """Greedy (or as `kw` says) through `enginesmith client`'s path: the tensorrt_llm model, all ids decoded."""
    with GrpcStreamClient(served.grpc_url, "tensorrt_llm", tok) as c:
        return c.generate(GenerateParams(max_tokens=n, **kw))


def stream_text(chunks, chat: bool = False) -> str:
    pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks if c.choices]
    return "".join(pieces)


def test_models_list_the_recipe_and_unknown_models_are_404(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).owned_by == "enginesmith"
    for call in (lambda: oai.models.retrieve("nope"),
                 lambda: oai.completions.create(model="nope", prompt="x", max_tokens=2)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found" and "'nope' does not exist" in e.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completion_equals_the_triton_paths(oai, served, tok, stream):
    n = 12
    expected = triton_text(served, tok, n, text=PROMPT)
    with HttpClient(served.http_url, "ensemble") as h:
        ensemble = h.generate(GenerateParams(text=PROMPT, max_tokens=n)).text
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0)
    if stream:
        chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text, usage = stream_text(chunks), chunks[-1].usage
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[:-1] == [None] * (len(finish) - 1) and len(finish) == len(expected.token_ids) + 1
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
        with GrpcStreamClient(served.grpc_url, "ensemble") as c:
            ensemble = c.generate(GenerateParams(text=PROMPT, max_tokens=n, request_id="e-greedy")).text
    else:
        r = oai.completions.create(**kw)
        text, usage, finish = r.choices[0].text, r.usage, [r.choices[0].finish_reason]
    assert text == expected.text  # `enginesmith client stream --model tensorrt_llm`: every id decoded at once
    # the ensemble's incremental detokenizer never learns the stream ended, so it keeps back the characters the
    # last tokens leave incomplete (U+FFFD when decoded); everything before them is the same text
    assert ensemble and text.startswith(ensemble) and set(text[len(ensemble):]) <= {"\ufffd"}
    assert usage.prompt_tokens == len(tok.encode(PROMPT)) and usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert finish[-1] == ("length" if len(expected.token_ids) == n else "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_is_the_chat_template_prompt_through_triton(oai, served, tok, chat_tok, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    ids = chat_tok.encode(chat_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)
    assert ids[0] == chat_tok.bos_token_id and ids.count(chat_tok.bos_token_id) == 1
    expected = triton_text(served, tok, 10, input_ids=ids)
    kw = dict(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    if stream:
        chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].id.startswith("chatcmpl-")
        text, usage = stream_text(chunks, chat=True), chunks[-1].usage
    else:
        r = oai.chat.completions.create(**kw)
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
        text, usage = r.choices[0].message.content, r.usage
    assert text == expected.text
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(expected.token_ids)


def test_seeded_sampling_matches_triton_and_a_stop_string_ends_the_text(oai, served, tok):
    sampled = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95)
    a = oai.completions.create(**sampled, seed=7).choices[0].text
    assert a == oai.completions.create(**sampled, seed=7).choices[0].text
    assert a == triton_text(served, tok, 12, text=PROMPT, temperature=0.9, top_p=0.95, seed=7).text
    assert a != oai.completions.create(**sampled, seed=8).choices[0].text
    whole = triton_text(served, tok, 12, text=PROMPT).text
    stop = next(whole[i:i + 2] for i in range(2, len(whole) - 1) if whole[i:i + 2].strip())
    cut = whole[:whole.find(stop)]
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "never-generated"])
    r = oai.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(oai.completions.create(**kw, stream=True))
    assert stream_text(chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_bad_parameters_are_openai_shaped_400s(oai):
    cases = [(dict(n=2), "n", None), (dict(temperature=3.0), "temperature", None),
             (dict(max_tokens=100_000), "max_tokens", "context_length_exceeded"),
             (dict(extra_body={"top_k": -1}), "top_k", None)]
    for kw, param, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=MODEL, prompt=PROMPT, **{"max_tokens": 4, **kw})
        assert (e.value.status_code, e.value.param, e.value.code, e.value.type) == (
            400, param, code, "invalid_request_error"), e.value.body
    with pytest.raises(openai.BadRequestError, match="prompt has 300 tokens, more than this model's maximum input"):
        oai.completions.create(model=MODEL, prompt=[5] * 300, max_tokens=4)
    assert oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


def curl(url: str, body: str | None = None, *extra: str) -> tuple[int, str]:
    args = ["curl", "-sS", "-N", "-w", "\n%{http_code}", *extra, url]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "-d", body]
    out = subprocess.run(args, capture_output=True, timeout=120, check=True).stdout.decode()  # keeps \r\n
    text, _, status = out.rpartition("\n")
    return int(status), text


def test_curl_gets_sse_chunks_ending_with_done_and_shaped_errors(front):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    status, whole = curl(f"{front}/completions", json.dumps(body))
    assert status == 200
    status, raw = curl(f"{front}/completions", json.dumps({**body, "stream": True}), "-D", "-")
    head, _, events = raw.partition("\r\n\r\n")
    assert status == 200 and "content-type: text/event-stream" in head.lower()
    blocks = [b for b in events.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b[6:]) for b in blocks[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == json.loads(whole)["choices"][0]["text"]
    assert f"x-request-id: {chunks[0]['id']}" in head.lower()
    status, chat = curl(f"{front}/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}))
    assert status == 200 and chat.rstrip().endswith("data: [DONE]") and '"role":"assistant"' in chat
    for url, payload, want_status, param in [
            (f"{front}/completions", '{"model": "x", "prompt": "a"}', 404, "model"),
            (f"{front}/completions", '{"model": "%s", "prompt": "a", "n": 3}' % MODEL, 400, "n"),
            (f"{front}/completions", '{"model": ', 400, None),
            (f"{front}/chat/completions", '{"model": "%s", "messages": "hi"}' % MODEL, 400, "messages"),
            (f"{front}/nowhere", None, 404, None)]:
        status, text = curl(url, payload)
        error = json.loads(text)["error"]
        assert status == want_status and error["param"] == param and error["message"], (url, payload, text)
        assert set(error) == {"message", "type", "param", "code"}


def test_chat_without_a_template_is_a_400_and_completions_still_work(plain_front):
    with openai.OpenAI(base_url=plain_front, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "chat_template_missing" and "no chat template" in e.value.message
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).choices[0].finish_reason


def test_the_front_can_sit_on_the_ensemble_instead(served, tok, chat_tok):
    """Text in and out through Triton's pre/postprocessing models (the benchmark's comparison path)."""
    from enginesmith.triton_repo.openai_api.app import FrontConfig, create_app
    from enginesmith.triton_repo.openai_api.prompts import Limits
    from enginesmith.triton_repo.openai_api.runner import FrontServer

    cfg = FrontConfig(MODEL, served.grpc_url, chat_tok.path, Limits(256, 512), triton_model="ensemble")
    server = FrontServer(create_app(cfg), "127.0.0.1", 0).start()
    try:
        with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as client:
            kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
            r = client.completions.create(**kw)
            with HttpClient(served.http_url, "ensemble") as h:
                assert r.choices[0].text == h.generate(GenerateParams(text=PROMPT, max_tokens=8)).text
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(PROMPT)), 8)
            chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            assert r.choices[0].text.startswith(stream_text(chunks)) and chunks[-1].usage.completion_tokens == 8
            messages = [{"role": "user", "content": PROMPT}]
            chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
            ids = chat_tok.encode(chat_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                  add_special_tokens=False)
            assert chat.usage.prompt_tokens == len(ids)  # the preprocessing model's count: one BOS, not two
            with pytest.raises(openai.BadRequestError, match="token-id prompts need the tensorrt_llm model"):
                client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2)
    finally:
        server.stop()


def generated_since(served, before: float) -> tuple[float, dict]:
    text = httpx.get(served.metrics_url).text
    return metric_total(text, "nv_trt_llm_output_tokens_total", "tensorrt_llm") - before, \
        metrics_sample(text, "tensorrt_llm")


def wait_idle(served, before: float) -> tuple[float, dict]:
    """Once the runtime is idle and its token counter has stopped moving: tokens generated since `before`."""
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        time.sleep(0.4)
        generated, s = generated_since(served, before)
        if s.get("active") == 0 and s.get("kv_used") == 0 and generated == last:
            break
        last = generated
    return generated, s


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_request_on_the_server(front, oai, served, stream):
    before = metric_total(httpx.get(served.metrics_url).text, "nv_trt_llm_output_tokens_total", "tensorrt_llm")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0}
    engine = engine_holder(served.server.proc.pid, "tensorrt_llm")
    with contextlib.ExitStack() as stopped:  # the engine is paused while the client goes away (however loaded
        if stream:  # the machine, the cancellation reaches the server before the request could end)
            with oai.completions.create(**body, stream=True, extra_body={"min_tokens": LONG}) as chunks:
                for i, _ in enumerate(chunks):
                    if i == 3:
                        stopped.enter_context(paused(engine))
                        break  # leaving the block closes the connection
        else:  # a whole (non-streamed) response: close the socket while the server generates it
            payload = json.dumps({**body, "min_tokens": LONG}).encode()
            host, port = front.removeprefix("http://").removesuffix("/v1").split(":")
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
                deadline = time.monotonic() + 60
                while generated_since(served, before)[0] < 3:
                    assert time.monotonic() < deadline, "generation did not start"
                    time.sleep(0.05)
                stopped.enter_context(paused(engine))
    generated, state = wait_idle(served, before)
    assert state.get("active") == 0 and state.get("kv_used") == 0
    assert 3 <= generated < LONG
    assert oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_bench_targets_the_front(front, served, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", front, "--tokenizer", str(served.tokenizer_dir), "--concurrency", "1,2", "--num-prompts", "3",
        "--isl", "8", "--osl", "4", "--warmup", "1", "--output-dir", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    runs = load_runs(tmp_path / "bench.json")
    assert [r["total_output_tokens"] for r in runs] == [12, 12] and [r["completed"] for r in runs] == [3, 3]
    assert {r["backend"] for r in runs} == {"openai-completions-stream"} and runs[0]["model_id"] == MODEL
    # an SSE event per streamed response: one per token, or several tokens together where they queued up
    assert all(len(itl) <= 3 for r in runs for itl in r["itls"]) and any(len(r["itls"][0]) > 0 for r in runs)
    r = CliRunner().invoke(app, ["bench", front, "--backend", "triton", "--tokenizer", str(served.tokenizer_dir)])
    assert r.exit_code == 1 and "is an OpenAI API URL: use --backend openai" in r.output


@pytest.mark.parametrize("procs", [1, 2])
def test_bench_reads_triton_statistics_through_the_front(front, served, tok, procs):
    """Also from two client processes, each with its own HTTP client: the statistics count both."""
    import asyncio

    from enginesmith.client.bench import BenchConfig, LoadPoint, run_bench
    from enginesmith.client.dataset import random_prompts

    cfg = BenchConfig(served.grpc_url, "", None, [LoadPoint("concurrency", 2)], num_prompts=3, warmup=0,
                      backend="openai", openai_url=front, client_procs=procs)
    (r,) = asyncio.run(run_bench(cfg, random_prompts(tok, 3, 8, 5, seed=3), show_progress=False))
    assert r["completed"] == 3 and r["total_output_tokens"] == 15 and r["total_input_tokens"] == 24
    assert r["triton_stats"]["tensorrt_llm"]["requests"] == 3
    assert r["client_procs"] == procs and sum(r["client_requests_per_proc"]) == 3


def test_serve_starts_the_front_beside_tritonserver(tmp_path):
    from tests.test_server_pipeline import tiny_layout
    from enginesmith.triton_repo.server import free_port

    recipe, port = tiny_layout(tmp_path, "tiny-front"), free_port()
    cmd = [sys.executable, "-m", "enginesmith.builders.cli", "serve", str(recipe), "--out", str(tmp_path / "out"),
           "--openai-port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == ["tiny-front"]
            r = client.completions.create(model="tiny-front", prompt=PROMPT, max_tokens=4, temperature=0)
            assert r.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert f"OpenAI API: http://127.0.0.1:{port}/v1 (model 'tiny-front')" in output and "tritonserver stopped" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
