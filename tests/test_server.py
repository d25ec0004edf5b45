"""The generated repository served by a real tritonserver (the one bundled in nvidia-pytriton).

`text_server` serves only our preprocessing and postprocessing models over a SentencePiece-style tokenizer:
round trips over HTTP and gRPC, streaming detokenization of multi-byte text, bad requests. Server discovery,
startup failures, taken ports and clean shutdown (no orphan process) are checked too; the whole pipeline is
in test_server_pipeline.py.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.sp_tokenizer import UNSEEN, make_sp_tokenizer
from tests.support import REPO_ROOT
from enginesmith.triton_repo import model_config as mc
from enginesmith.triton_repo.repository import MODELS_DIR, model_parameters
from enginesmith.triton_repo.server import ServerError, TritonServer, free_endpoints

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]


def text_repo(root: Path, tokenizer_dir: Path) -> Path:
    repo, o = root / "repo", mc.RepoOptions(triton_max_batch_size=8, decoupled=True)
    params = model_parameters(root / "no-engine", tokenizer_dir)
    for name, build in (("preprocessing", mc.preprocessing_config), ("postprocessing", mc.postprocessing_config)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(mc.to_pbtxt(build(o, params[name])))
        shutil.copyfile(MODELS_DIR / f"{name}.py", repo / name / "1" / "model.py")
    return repo


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp-tok")
    return d, make_sp_tokenizer(d)


@pytest.fixture(scope="module")
def text_server(tmp_path_factory, sp_tok):
    root = tmp_path_factory.mktemp("text-server")
    with TritonServer(text_repo(root, sp_tok[0]), log_path=root / "server.log") as server:
        yield server


def bytes_input(mod, name: str, rows: list[list[str]]):
    arr = np.array([[s.encode() for s in row] for row in rows], dtype=np.object_)
    t = mod.InferInput(name, list(arr.shape), "BYTES")
    t.set_data_from_numpy(arr)
    return t


def array_input(mod, name: str, arr: np.ndarray, dtype: str):
    t = mod.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def postprocess(client, mod, tokens: list[int], request_id: str = "") -> str:
    ids = np.array([[tokens]], dtype=np.int32)
    inputs = [array_input(mod, "TOKENS_BATCH", ids, "INT32"),
              array_input(mod, "SEQUENCE_LENGTH", np.array([[len(tokens)]], dtype=np.int32), "INT32")]
    result = client.infer("postprocessing", inputs, request_id=request_id)
    out = result.as_numpy("OUTPUT")
    assert out.shape == (1,)  # [batch * beam], as upstream's postprocessing returns it
    return out[0].decode()


def test_preprocessing_round_trip_over_http(text_server, sp_tok):
    import tritonclient.http as http

    tok = sp_tok[1]
    client = http.InferenceServerClient(text_server.http_url.removeprefix("http://"))
    inputs = [bytes_input(http, "QUERY", [[UNSEEN]]),
              array_input(http, "REQUEST_OUTPUT_LEN", np.array([[7]], dtype=np.int32), "INT32"),
              bytes_input(http, "STOP_WORDS_DICT", [["Paris", "world"]])]
    out = client.infer("preprocessing", inputs)
    ids = tok.encode(UNSEEN)
    assert out.as_numpy("INPUT_ID")[0].tolist() == ids
    assert out.as_numpy("REQUEST_INPUT_LEN").tolist() == [[len(ids)]]
    assert out.as_numpy("REQUEST_OUTPUT_LEN").tolist() == [[7]]
    paris, world = (tok.encode(w, add_special_tokens=False) for w in ("Paris", "world"))
    stop = out.as_numpy("STOP_WORDS_IDS")
    assert stop.shape == (1, 2, len(paris) + len(world))
    assert stop[0, 0].tolist() == paris + world and stop[0, 1, :2].tolist() == [len(paris), len(paris + world)]
    assert out.as_numpy("BAD_WORDS_IDS").shape == (1, 2, 0)
    assert out.as_numpy("OUT_END_ID").tolist() == [[tok.eos_token_id]]
    assert out.as_numpy("OUT_PAD_ID").tolist() == [[tok.eos_token_id]]  # no pad token: falls back to eos


def test_postprocessing_round_trip_over_grpc(text_server, sp_tok):
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(text_server.grpc_url)
    assert postprocess(client, grpc, sp_tok[1].encode(UNSEEN, add_special_tokens=False)) == UNSEEN


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_streamed_chunks_are_detokenized_per_stream_from_the_ledger(text_server, sp_tok, protocol):
    """One token per request, as the ensemble sends streamed responses. Chunks the ledger records (as the
    reference tensorrt_llm model does) join to the exact text, for two interleaved streams of one request id;
    chunks it does not know are decoded alone, as upstream does."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    from enginesmith.triton_repo.detokenize import LedgerWriter, server_ledger_path, stream_key

    mod = http if protocol == "http" else grpc
    url = text_server.http_url.removeprefix("http://") if protocol == "http" else text_server.grpc_url
    client = mod.InferenceServerClient(url)
    ids = sp_tok[1].encode(UNSEEN, add_special_tokens=False)
    naive = "".join(postprocess(client, mod, [t], "no-stream") for t in ids)  # unknown chunks: each alone
    assert naive != UNSEEN and "\ufffd" in naive  # upstream's bug
    other = sp_tok[1].encode("Hello world! Paris is café", add_special_tokens=False)
    ledger = LedgerWriter(server_ledger_path(text_server.proc.pid))
    try:
        got = {"a": "", "b": ""}
        for i in range(max(len(ids), len(other)) + 1):
            for s, seq in (("a", ids), ("b", other)):
                if i <= len(seq):  # the final chunk holds no token
                    chunk = seq[i:i + 1]
                    ledger.sent(f"{protocol}-{s}", stream_key("same-id", 0), chunk, i == len(seq))
                    got[s] += postprocess(client, mod, chunk, "same-id")
    finally:
        ledger.close()
    assert got == {"a": UNSEEN, "b": "Hello world! Paris is café"}


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(text_server, sp_tok):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(text_server.http_url.removeprefix("http://"))
    length = array_input(http, "REQUEST_OUTPUT_LEN", np.array([[4]], dtype=np.int32), "INT32")
    bad = [
        ([bytes_input(http, "QUERY", [[""]]), length], "QUERY (text_input) row 0 is empty"),
        ([bytes_input(http, "QUERY", [["hi"]]),
          array_input(http, "REQUEST_OUTPUT_LEN", np.array([[0]], dtype=np.int32), "INT32")], "row 0 is 0"),
        ([bytes_input(http, "QUERY", [["hi"]]),
          array_input(http, "REQUEST_OUTPUT_LEN", np.array([[4.0]], dtype=np.float32), "FP32")], "expects 'INT32'"),
        ([bytes_input(http, "QUERY", [["hi"]]), length, bytes_input(http, "IMAGE_URL", [["http://x/y.png"]])],
         "IMAGE_URL is not supported"),
    ]
    for inputs, message in bad:
        with pytest.raises(InferenceServerException, match=re.escape(message)) as err:
            client.infer("preprocessing", inputs)
        assert err.value.status() == "400", err.value  # the client's fault: INVALID_ARG, not a server error
    with pytest.raises(InferenceServerException, match="unknown|not found"):
        client.infer("no_such_model", [length])
    ok = client.infer("preprocessing", [bytes_input(http, "QUERY", [["hi"]]), length])
    assert ok.as_numpy("INPUT_ID")[0].tolist() == sp_tok[1].encode("hi")


def server_processes(server: TritonServer) -> list[psutil.Process]:
    proc = psutil.Process(server.proc.pid)
    return [proc, *proc.children(recursive=True)]


def test_clean_shutdown_leaves_no_process(tmp_path, sp_tok):
    server = TritonServer(text_repo(tmp_path, sp_tok[0]), log_path=tmp_path / "server.log").start()
    procs = server_processes(server)
    assert any("triton_python_backend_stub" in " ".join(p.cmdline()) for p in procs)
    t = time.monotonic()
    server.stop()
    assert time.monotonic() - t < server.stop_timeout_s + 5
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert server.stop() is None  # idempotent


def test_startup_failure_reports_the_log_tail(tmp_path, sp_tok):
    repo = text_repo(tmp_path, sp_tok[0])
    (repo / "postprocessing" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('boom: no tokens')\n")
    server = TritonServer(repo, log_path=tmp_path / "server.log", ready_timeout_s=120)
    with pytest.raises(ServerError, match=r"(?s)exited with code 1 before it was ready.*boom: no tokens"):
        server.start()
    assert server.proc is None  # stopped and reaped


def test_servers_start_beside_a_running_grpc_client():
    """A process whose gRPC client runs (the bench, the tests, a notebook) starts servers too: the launch must
    not fork this process into running gRPC's fork handlers (a preexec_fn did, and about one child in ten
    aborted with "Epoll1Poller ... epoll_wait error: Bad file descriptor" before the server ran)."""
    import subprocess

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from enginesmith.triton_repo.server import _terminated_with_this_process

    nowhere = free_endpoints()
    client = grpcclient.InferenceServerClient(f"{nowhere.grpc_address}:{nowhere.grpc_port}")
    client.start_stream(callback=lambda result, error: None)
    with pytest.raises(InferenceServerException):  # nothing listens there: the client's poller is busy
        client.is_server_live()
    try:
        runs = [subprocess.run(_terminated_with_this_process(["true", "x"]), capture_output=True) for _ in range(100)]
    finally:
        client.stop_stream()
        client.close()
    assert [(r.returncode, r.stderr) for r in runs if r.returncode or r.stderr] == []


# ---- discovery and ports ------------------------------------------------------------------------------------
def test_tritonserver_on_path_wins(tmp_path, monkeypatch):
    from enginesmith.triton_repo.discovery import find_server

    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    found = find_server(tmp_path / "cache")
    assert found.path == fake and found.backend_dir is None and not found.bundled


def test_bundled_server_environment(tmp_path):
    from enginesmith.triton_repo.discovery import PY, bundled_server, installation_prefix, linked_libpython

    b = bundled_server(tmp_path)
    assert b.bundled and b.path.name == "tritonserver" and b.path.is_file()
    backend = b.backend_dir / "python"
    assert sorted(p.name for p in backend.iterdir()) == ["libtriton_python.so", "triton_python_backend_stub",
                                                         "triton_python_backend_utils.py"]
    assert "nvidia_pytriton.libs" in b.env["LD_LIBRARY_PATH"]
    first = Path(b.env["PATH"].split(":")[0])
    assert (first / "python3").exists()  # the stub's embedded Python finds its prefix here
    prefix = installation_prefix(linked_libpython(backend / "triton_python_backend_stub", b.env["LD_LIBRARY_PATH"]))
    cfg = first.parent / "pyvenv.cfg"
    from enginesmith.triton_repo.discovery import numpy_major

    if prefix.resolve() == Path(sys.base_prefix).resolve() and (numpy_major() or 0) < 2:
        assert first == Path(sys.executable).parent
    else:  # stdlib of the stub's libpython, site-packages of this environment
        assert f"home = {prefix / 'bin'}" in cfg.read_text()
        pth = first.parent / "lib" / f"python{PY}" / "site-packages" / "_enginesmith_site.pth"
        assert str(REPO_ROOT) in pth.read_text()


def test_taken_port_is_retried_on_fresh_ports(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ep = free_endpoints()
        server = TritonServer(tmp_path, log_path=tmp_path / "server.log")  # an empty repository serves nothing
        server.endpoints = type(ep)(taken.getsockname()[1], ep.grpc_port, ep.metrics_port)
        with server:
            assert server.endpoints.http_port != taken.getsockname()[1] and server.is_ready()
        assert "already in use" in server.log_tail(400)


def test_shared_memory_registration_needs_the_secret_header(tmp_path):
    """What `serve --public` passes: Triton's restricted protocols refuse shared-memory calls without the header,
    over HTTP and gRPC, while the other APIs stay open."""
    import dataclasses

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    ep = dataclasses.replace(free_endpoints(), shm_header=("enginesmith-shm-key", "s3cret"))
    with TritonServer(tmp_path, ep, log_path=tmp_path / "server.log") as server:  # an empty repository
        http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        # gRPC clients send the key as metadata with Triton's prefix
        for client, key in ((http, "enginesmith-shm-key"), (grpc, "triton-grpc-protocol-enginesmith-shm-key")):
            assert client.is_server_ready()
            with pytest.raises(InferenceServerException, match=f"restricted, expecting header '{key}'"):
                client.register_system_shared_memory("stolen", "/prefix0_region", 64)
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_system_shared_memory_status()
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_system_shared_memory_status(headers={key: "guess"})
            client.get_system_shared_memory_status(headers={key: "s3cret"})  # the holder of the secret may
        http.close()
        grpc.close()
