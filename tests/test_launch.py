"""The tritonserver / mpirun command lines (golden argv lists)."""

from __future__ import annotations

import pytest

from enginesmith.triton_repo.launch import Endpoints, build_mpirun_argv, build_server_argv

EP = Endpoints(9000, 9001, 9002)
PORTS = ["--http-address=127.0.0.1", "--http-port=9000", "--grpc-address=127.0.0.1", "--grpc-port=9001",
         "--metrics-address=127.0.0.1", "--metrics-port=9002"]


def rank_args(rank: int, *extra: str) -> list[str]:
    return ["-n", "1", "/opt/tritonserver/bin/tritonserver", "--model-repository=/repo", *PORTS,
            "--disable-auto-complete-config", *extra, f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]


def test_single_server():
    assert build_server_argv("/bin/tritonserver", "/repo", EP, backend_dir="/be", exit_timeout_s=5) == [
        "/bin/tritonserver", "--model-repository=/repo", *PORTS, "--disable-auto-complete-config",
        "--backend-directory=/be", "--exit-timeout-secs=5"]


def test_leader_mode_four_ranks():
    argv = build_mpirun_argv(4, "/opt/tritonserver/bin/tritonserver", "/repo", EP)
    explicit = ("--model-control-mode=explicit", "--load-model=tensorrt_llm")
    assert argv == ["mpirun", "--allow-run-as-root",
                    *rank_args(0), ":", *rank_args(1, *explicit), ":", *rank_args(2, *explicit), ":",
                    *rank_args(3, *explicit)]
    # ports appear once per rank (upstream's launcher repeats them), the same on every rank
    assert argv.count("--http-port=9000") == 4


def test_rank0_logs_and_global_options():
    argv = build_mpirun_argv(2, "ts", "/repo", EP, hosts=("node0", "node1"), slots_per_host=8,
                             env_vars=("LD_LIBRARY_PATH", "PATH"), oversubscribe=True, log_file="/tmp/t.log",
                             exit_timeout_s=10, backend_dir="/be", tensorrt_llm_models=("tensorrt_llm", "draft"))
    head = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-H", "node0:8,node1:8",
            "-x", "LD_LIBRARY_PATH", "-x", "PATH"]
    common = ["--model-repository=/repo", *PORTS, "--disable-auto-complete-config", "--backend-directory=/be",
              "--exit-timeout-secs=10"]
    assert argv == [*head,
                    "-n", "1", "ts", *common, "--log-verbose=0", "--log-file=/tmp/t.log",
                    "--backend-config=python,shm-region-prefix-name=prefix0_", ":",
                    "-n", "1", "ts", *common, "--model-control-mode=explicit", "--load-model=tensorrt_llm",
                    "--load-model=draft", "--backend-config=python,shm-region-prefix-name=prefix1_"]


def test_hostfile():
    argv = build_mpirun_argv(1, "ts", "/repo", EP, hostfile="/etc/hosts.mpi", allow_run_as_root=False,
                             mpirun="/usr/bin/mpirun")
    assert argv[:3] == ["/usr/bin/mpirun", "--hostfile", "/etc/hosts.mpi"]
    assert ":" not in argv


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=0), "world_size=0"),
    (dict(hosts=("a",), hostfile="/h"), "hosts or hostfile, not both"),
    (dict(tensorrt_llm_models=()), "tensorrt_llm_models"),
])
def test_bad_launch_options(kwargs, match):
    kwargs = {"world_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_mpirun_argv(kwargs.pop("world_size"), "ts", "/repo", EP, **kwargs)


def test_endpoints_must_be_distinct():
    with pytest.raises(ValueError, match="three distinct ports"):
        Endpoints(8000, 8000, 8002)


def test_shared_memory_restricted_behind_a_header():
    restricted = Endpoints(9000, 9001, 9002, "0.0.0.0", "0.0.0.0", "0.0.0.0", shm_header=("k", "v"))
    flags = ["--grpc-restricted-protocol=shared-memory:k=v", "--http-restricted-api=shared-memory:k=v"]
    assert restricted.args()[-2:] == flags
    assert all(f in build_server_argv("ts", "/repo", restricted) for f in flags)
    assert build_mpirun_argv(2, "ts", "/repo", restricted).count(flags[0]) == 2  # every rank
    assert not any("restricted" in a for a in build_server_argv("ts", "/repo", EP))


def test_serve_restricts_shared_memory_whenever_it_listens_beyond_loopback():
    import re

    from typer.testing import CliRunner

    from enginesmith.builders.cli import app
    from tests.support import REPO_ROOT

    def command(*flags: str) -> str:
        r = CliRunner().invoke(app, ["serve", str(REPO_ROOT / "recipes" / "tiny-llama.yaml"), "--print-command",
                                     *flags])
        assert r.exit_code == 0, r.output
        return r.stdout

    secret = r"enginesmith-shm-key=([0-9a-f]{32})\b"
    public = command("--public")
    grpc = re.search(rf"--grpc-restricted-protocol=shared-memory:{secret}", public)
    http = re.search(rf"--http-restricted-api=shared-memory:{secret}", public)
    assert grpc and http and grpc.group(1) == http.group(1)
    assert grpc.group(1) != re.search(secret, command("--public")).group(1)  # a fresh secret per launch
    assert "--http-restricted-api=shared-memory:" in command("--http-address", "10.0.0.5")
    assert "restricted" not in command() and "restricted" not in command("--grpc-address", "::1")
