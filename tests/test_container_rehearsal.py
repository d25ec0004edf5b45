"""`make check-container`: the container user's steps up to TensorRT-LLM, and its comparisons, checked."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from tests.container_rehearsal import (REPO_ROOT, UPSTREAM_CASES, UPSTREAM_SCRIPT, compare_launch, rehearse,
                                       upstream_cases)
from enginesmith.triton_repo.launch import Endpoints, build_mpirun_argv


def _ours(case: dict) -> list[str]:
    """Our MPMD mpirun line for the case's inputs (serve runs a single rank without mpirun)."""
    a = case["args"]
    ep = Endpoints(int(a["http_port"]), int(a["grpc_port"]), int(a["metrics_port"]))
    return build_mpirun_argv(a["world_size"], a["tritonserver"], a["model_repo"], ep, exit_timeout_s=a["exit_timeout"])


def test_recorded_upstream_cases_name_their_source():
    data = json.loads(UPSTREAM_CASES.read_text())
    assert data["source"] == {"repository": "NVIDIA/TensorRT-LLM", "path": "triton_backend/scripts/"
                              "launch_triton_server.py", "commit": "0a2e2c1f1268b34586393794045691b666ba28be",
                              "function": "get_cmd"}
    assert sorted(c["args"]["world_size"] for c in data["cases"]) == [1, 2, 4, 4]


@pytest.mark.parametrize("case", upstream_cases(None), ids=lambda c: f"ws{c['args']['world_size']}"
                         f"{'-timeout' if c['args']['exit_timeout'] else ''}")
def test_our_launch_builds_upstreams_ranks(case):
    assert compare_launch(case["argv"], _ours(case)) == []


def test_a_difference_in_a_rank_is_reported():
    case = next(c for c in upstream_cases(None) if c["args"]["world_size"] == 4)
    ours = _ours(case)
    broken = [t for t in ours if t != "--load-model=tensorrt_llm"]
    assert compare_launch(case["argv"], broken) == [f"rank {r}: ours lacks ['--load-model=tensorrt_llm'], adds []"
                                                    for r in (1, 2, 3)]
    assert compare_launch(case["argv"], ours[:ours.index(":")]) == ["4 ranks upstream, 1 ours"]
    renamed = [t.replace("prefix2_", "p2_") for t in ours]
    assert any(d.startswith("rank 2: ours lacks ['--backend-config=python,shm-region-prefix-name=prefix2_']")
               for d in compare_launch(case["argv"], renamed))


STAND_IN_SCRIPT = """import argparse, json
CASES = {cases!r}
def parse_arguments():
    p = argparse.ArgumentParser()
    p.add_argument('--world_size', type=int, default=1)
    for name in ('tritonserver', 'model_repo', 'grpc_port', 'http_port', 'metrics_port'):
        p.add_argument('--' + name, type=str)
    p.add_argument('--exit_timeout', type=int, default=None)
    p.set_defaults(log=False, log_file='triton_log.txt', tensorrt_llm_model_name='tensorrt_llm', oversubscribe=False,
                   multimodal_gpu0_cuda_mem_pool_bytes=0, no_mpi=False, trtllm_llmapi_launch=False, multi_model=False)
    return p.parse_args()
def get_cmd(world_size, tritonserver, grpc_port, http_port, metrics_port, model_repo, log, log_file,
            tensorrt_llm_model_name, oversubscribe, multimodal_gpu0_cuda_mem_pool_bytes, no_mpi,
            trtllm_llmapi_launch, exit_timeout=None):
    assert args.multi_model is False  # upstream reads this module global
    return CASES[json.dumps(dict(locals()), sort_keys=True)]
"""


def test_upstream_script_given_is_run_and_must_still_build_the_recorded_lines(tmp_path):
    """A stand-in for upstream's script (the real one is not kept here): each case's command line goes through its
    parse_arguments, the result through its get_cmd."""
    from tests.container_rehearsal import RehearsalError

    cases = {json.dumps(c["args"], sort_keys=True): c["argv"] for c in upstream_cases(None)}
    script = tmp_path / "launch_triton_server.py"
    script.write_text(STAND_IN_SCRIPT.format(cases=cases))
    derived = upstream_cases(script)
    assert all(c.pop("from_script") for c in derived) and derived == upstream_cases(None)
    script.write_text(STAND_IN_SCRIPT.format(cases=cases).replace("log_file='triton_log.txt'", "log_file='t.log'"))
    with pytest.raises(RehearsalError, match=r"parses `--world_size 1 --tritonserver .*` into .*'log_file': 't.log'"):
        upstream_cases(script)
    script.write_text(STAND_IN_SCRIPT.format(cases=cases).replace("return CASES[", "return ['changed'] + CASES["))
    with pytest.raises(RehearsalError, match="no longer builds the recorded command for `--world_size 1 "):
        upstream_cases(script)


def test_the_vendored_upstream_script_builds_the_recorded_lines():
    """tensorrtllm_backend's launch_triton_server.py (kept byte for byte) is run on every recorded case it has the
    options for; the case it predates (--exit_timeout) stays checked by the record."""
    text = (REPO_ROOT / "tests/data/upstream-launch/SOURCE.md").read_text()
    digest = hashlib.sha256(UPSTREAM_SCRIPT.read_bytes()).hexdigest()
    assert digest in text and "Apache License" in (UPSTREAM_SCRIPT.parent / "LICENSE").read_text()
    cases = upstream_cases()
    ran = sorted(c["args"]["world_size"] for c in cases if c.get("from_script"))
    assert ran == [1, 2, 4] and all(not c["args"]["exit_timeout"] for c in cases if c.get("from_script"))
    assert len(cases) == len(ran) + 1


def _make_n(python: str) -> str:
    return subprocess.run(["make", "-n", "--no-print-directory", "venv", "VENV=/nonexistent/venv",
                           f"PYTHON={python}"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout


def test_make_venv_installs_torch_only_where_the_base_python_has_none(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], check=True)
    plain = _make_n(str(tmp_path / "bare" / "bin" / "python"))  # a Python without torch
    assert '"torch==' in plain and "--without-pip" not in plain and "kernels" in plain
    # numpy 2 goes in after the extras (nvidia-pytriton declares numpy<2 for its stubs, hence no conflict warning)
    pip_lines = [line for line in plain.splitlines() if " -m pip install " in line]
    assert pip_lines[-1].endswith('--no-warn-conflicts "numpy>=2,<2.4"') and "-e " in pip_lines[-2]
    over = _make_n(sys.executable)  # this environment has torch
    assert '"torch==' not in over and "--without-pip" in over and "-c /nonexistent/venv/base-constraints.txt" in over
    assert "torch,client,dev" in over and "base_env.py report" in over
    assert "numpy" not in over  # the base's numpy stays: a constraint, never installed over


@pytest.mark.server
@pytest.mark.timeout(600)
def test_plain_tritonserver_gives_the_bundled_stub_its_private_numpy_under_numpy2(tmp_path, monkeypatch):
    """Where this environment has numpy 2, the plain server's stub Python (no enginesmith) still gets the numpy 1.x
    the bundled stub needs, first on its path, and the models' guard is set."""
    import numpy as np
    import tritonclient.http as http

    from tests.container_rehearsal import plain_tritonserver
    from tests.test_stub_numpy import echo_repo
    from enginesmith.triton_repo import discovery

    monkeypatch.setattr(discovery, "numpy_major", lambda: 2)
    with plain_tritonserver(echo_repo(tmp_path), ["echo"], tmp_path / "work") as (url, env):
        client = http.InferenceServerClient(url.removeprefix("http://"))
        text = http.InferInput("T", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
        ints = http.InferInput("I", [1], "INT32")
        ints.set_data_from_numpy(np.array([7], dtype=np.int32))
        res = client.infer("echo", [text, ints])
    assert res.as_numpy("TO").tolist() == [b"abc"] and res.as_numpy("IO").tolist() == [14]
    version, has_long, path = res.as_numpy("NP")[0].decode().split(" ", 2)
    assert int(version.split(".")[0]) < 2 and "stub-numpy-py" in path and has_long == "True"
    assert env[discovery.NUMPY_GUARD_ENV] == "2"


@pytest.mark.server
@pytest.mark.timeout(600)
def test_the_rehearsal_runs_every_step(tmp_path):
    lines = rehearse(tmp_path / "check").lines
    text = "\n".join(lines)
    assert lines[0].startswith("install: make venv over ") and "base environment kept: torch" in lines[0]
    assert "dry runs: llama3-70b-tp2-pp2.yaml: plan, convert (4 rank files listed)" in text
    assert "repo: llama3-70b-tp2-pp2.yaml (node 1): " in text and "per-node directories" in text
    assert "repo: kimi-k2-16xa100.yaml: LLM-API model.yaml built" in text
    assert "without enginesmith (stub Python imports neither enginesmith nor builders)" in text
    assert "launch: llama3-70b-tp2-pp2.yaml: --world_size 4: same ranks, flags and shm prefixes" in text
    assert lines[-1].startswith("stopped where TensorRT-LLM itself runs")
    venv_site = next((tmp_path / "check" / "env" / "venv" / "lib").glob("python*/site-packages"))
    assert not (venv_site / "torch").exists() and not (venv_site / "transformers").exists()
