"""Rehearse on this machine what a user of NVIDIA's Triton TensorRT-LLM container does, up to TensorRT-LLM itself.

`make check-container` (or `python -m tests.container_rehearsal --out DIR`) runs, printing each step:
1. install: `make venv` over a Python that already holds torch (a bare venv whose site-packages path lists this
   environment's, as a container's Python lists its own), offline; pip must not reinstall anything it holds;
2. plan, convert --dry-run and build --dry-run of every engine recipe with that install, and the LLM-API
   recipe's build (it writes YAML only);
3. repo of every trtllm-engine recipe against a stand-in engine directory (a config.json as trtllm-build writes
   it, marked as a stand-in, and placeholder rank files), for one directory and for per-node directories;
4. preprocessing, postprocessing and the BLS of such a repository on a plain `tritonserver --model-repository`
   whose Python has numpy and transformers but no enginesmith, with a request through pre- and postprocessing;
5. upstream's launch_triton_server.py (vendored in tests/data/upstream-launch/, or another copy with
   --upstream-script) run on each recorded case's options, its command lines beside our leader-mode mpirun
   lines, rank by rank.
Nothing builds, runs or fakes an engine: trtllm-build and the tensorrtllm backend are where it stops.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_CASES = REPO_ROOT / "tests" / "data" / "upstream-launch" / "get_cmd-cases.json"
UPSTREAM_SCRIPT = REPO_ROOT / "tests" / "data" / "upstream-launch" / "launch_triton_server.py"
"""Upstream's script as tensorrtllm_backend last kept it (vendored with its license; see SOURCE.md there)."""
ENGINE_TARGETS = ("trtllm-engine", "trtllm-llmapi")
SELF_CONTAINED = ("preprocessing", "postprocessing", "tensorrt_llm_bls")
# Flags our leader-mode line adds to upstream's (bind addresses, the bundled server's backends, logging).
OUR_EXTRA_FLAGS = ("--http-address=", "--grpc-address=", "--metrics-address=", "--backend-directory=",
                   "--exit-timeout-secs=", "--log-verbose=", "--log-file=")


class RehearsalError(RuntimeError):
    """A step did not do what a container user needs."""


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)


def run(argv: list[str], cwd: Path = REPO_ROOT, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise RehearsalError(f"`{' '.join(map(str, argv))}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def engine_recipes() -> list[Path]:
    import yaml

    return [p for p in sorted((REPO_ROOT / "recipes").glob("*.yaml"))
            if yaml.safe_load(p.read_text())["build"]["target"] in ENGINE_TARGETS]


# ---- 1. install over a Python that already holds torch ------------------------------------------------------
def base_python(root: Path, extra: tuple[Path, ...] = ()) -> Path:
    """A Python that imports torch, numpy, transformers... from this environment, and nothing of enginesmith:
    a bare venv whose site-packages lists this environment's as plain paths (no .pth files run); `extra`
    folders come first."""
    base = root / "base"
    run([sys.executable, "-m", "venv", "--without-pip", base])
    py = base / "bin" / "python"
    purelib = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    (Path(purelib) / "_held.pth").write_text("\n".join([*map(str, extra), *site.getsitepackages()]) + "\n")
    return py


def install(root: Path, report: Report) -> Path:
    """`make venv` over the base Python; returns the venv's python."""
    base = base_python(root)
    venv = root / "venv"
    out = run(["make", "--no-print-directory", "venv", f"VENV={venv}", f"PYTHON={base}",
               "PIP_FLAGS=--no-index --no-build-isolation"])
    py = venv / "bin" / "python"
    if "--without-pip" not in out or '"torch==' in out or "base-constraints.txt" not in out:
        raise RehearsalError(f"make venv did not take the base-Python path:\n{out}")
    facts = json.loads(run([py, "-c", "import json, enginesmith.builders, torch; print(json.dumps("
                                      "[torch.__file__, enginesmith.builders.__file__]))"], cwd=root).splitlines()[-1])
    if Path(facts[0]).resolve().is_relative_to(venv.resolve()):
        raise RehearsalError(f"torch was installed into the venv ({facts[0]})")
    if not Path(facts[1]).resolve().is_relative_to(REPO_ROOT):
        raise RehearsalError(f"the venv imports enginesmith from {facts[1]}, not this checkout")
    kept = [line for line in out.splitlines() if line.startswith(("base environment kept", "TensorRT-LLM"))]
    report.say(f"install: make venv over {base} (torch from {Path(facts[0]).parent}); " + "; ".join(kept))
    return py


# ---- 2. plan and dry runs ----------------------------------------------------------------------------------
def dry_runs(py: Path, out: Path, report: Report) -> None:
    for recipe in engine_recipes():
        rel = recipe.relative_to(REPO_ROOT)
        es = [py, "-m", "enginesmith.builders.cli"]
        run([*es, "plan", rel])
        conv = run([*es, "convert", rel, "--out", out, "--dry-run"])
        build = run([*es, "build", rel, "--out", out, "--dry-run"])
        trt = next((x for x in build.splitlines() if x.startswith("# TensorRT-LLM")), "")
        report.say(f"dry runs: {rel.name}: plan, convert ({len([x for x in conv.splitlines() if 'rank' in x])} "
                   f"rank files listed), build ({trt.lstrip('# ') or 'LLM-API YAML shown'})")


# ---- 3. repositories over stand-in engine directories -------------------------------------------------------
def stand_in_engine(recipe, plan, engine_dir: Path, ranks) -> None:
    """What trtllm-build leaves in --output_dir, as far as the repository reads it: config.json (marked as a
    stand-in) and one placeholder file per rank. Not an engine, and no manifest claims it was built."""
    from enginesmith.builders.build.engine_check import LIMIT_KEYS
    from enginesmith.builders.build.engine_target import plan_engine_build
    from enginesmith.builders.build.flags import build_options

    bp = plan_engine_build(recipe, plan, "ckpt", engine_dir)
    asked = build_options(bp.choices)
    m = plan.mapping
    plugins = {k: v == "enable" if v in ("enable", "disable") else v for k, v in asked.items()
               if k not in LIMIT_KEYS}
    config = {"_stand_in": "written by tests/container_rehearsal.py in place of trtllm-build; not an engine",
              "pretrained_config": {"architecture": plan.spec.architecture, "dtype": recipe.model.dtype,
                                    "mapping": {"world_size": m.world_size, "tp_size": m.tp_size,
                                                "pp_size": m.pp_size}},
              "build_config": {**{k: int(asked[k]) for k in LIMIT_KEYS}, "plugin_config": plugins}}
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / "config.json").write_text(json.dumps(config, indent=2))
    for r in ranks:
        (engine_dir / f"rank{r}.engine").write_bytes(b"stand-in: not an engine")


def repositories(py: Path, out: Path, report: Report) -> Path:
    """Every trtllm-engine recipe's repository (one directory; per node for a multi-node layout) and the
    LLM-API recipe's build + repository. Returns a single-node engine repository for the serving step."""
    from enginesmith.builders.build.flags import node_ranks
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe
    from enginesmith.builders.tiny_model import make_tokenizer

    tokenizer = out / "stand-in-tokenizer"
    make_tokenizer(tokenizer)
    served = None
    for path in engine_recipes():
        rel, recipe = path.relative_to(REPO_ROOT), load_recipe(path)
        plan = make_plan(recipe, with_options=False)
        es = [py, "-m", "enginesmith.builders.cli"]
        if recipe.build.target == "trtllm-llmapi":
            shutil.copytree(tokenizer, out / "llmapi" / recipe.name / "checkpoint" / "tokenizer")
            run([*es, "build", rel, "--out", out / "llmapi"])
            run([*es, "repo", rel, "--out", out / "llmapi"])
            report.say(f"repo: {rel.name}: LLM-API model.yaml built and its llmapi repository written")
            continue
        layouts = {"one directory": (out / "shared", None)}
        nodes = node_ranks(plan)
        if len(nodes) > 1:
            layouts |= {f"node {n}": (out / f"node{n}", rs) for n, rs in nodes.items()}
        for name, (root, ranks) in layouts.items():
            stage = root / recipe.name
            stand_in_engine(recipe, plan, stage / "engine", ranks or range(plan.mapping.world_size))
            shutil.copytree(tokenizer, stage / "checkpoint" / "tokenizer")
            flags = ["--ranks", ",".join(map(str, ranks))] if ranks else []
            said = run([*es, "repo", rel, "--out", root, *flags])
            manifest = json.loads((stage / "repo" / "manifest.json").read_text())
            missing = [f"{m}/1/enginesmith/triton_repo" for m in SELF_CONTAINED
                       if not (stage / "repo" / m / "1" / "enginesmith" / "triton_repo" / "__init__.py").is_file()]
            if missing:
                raise RehearsalError(f"{stage / 'repo'} lacks {', '.join(missing)}: not self-contained")
            where = next((x for x in said.splitlines() if "nodes," in x), "")
            report.say(f"repo: {rel.name} ({name}): {len(manifest['outputs'])} files, launch_ranks "
                       f"{manifest['launch_ranks']}{'; ' + where.split(':')[0] if where else ''}")
            if served is None and len(nodes) == 1:
                served = stage / "repo"
    if served is None:
        raise RehearsalError("no single-node trtllm-engine recipe to serve")
    return served


# ---- 4. a plain tritonserver, no enginesmith on its Python -------------------------------------------------
def clean_stub_env(root: Path, stub: Path, libs: str, first: Path | None = None) -> Path:
    """A venv-like folder for the Python-backend stub: the stub's own standard library, and this
    environment's site-packages as plain paths (numpy, transformers: yes; enginesmith's import hook: no).
    `first`: the private numpy < 2 the bundled stub needs under numpy 2 (triton_repo/discovery.py), ahead of them."""
    from enginesmith.triton_repo.discovery import NUMPY_COMPAT, PY, installation_prefix, linked_libpython

    prefix = installation_prefix(linked_libpython(stub, libs))
    env = root / "stub-env"
    sp = env / "lib" / f"python{PY}" / "site-packages"
    sp.mkdir(parents=True, exist_ok=True)
    (env / "bin").mkdir(exist_ok=True)
    (env / "pyvenv.cfg").write_text(f"home = {prefix / 'bin'}\ninclude-system-site-packages = false\n")
    target = prefix / "bin" / f"python{PY}"
    (env / "bin" / "python3").symlink_to(target if target.exists() else Path(sys.executable).resolve())
    private = [f"import sys; sys.path.insert(0, {str(first)!r}); import {NUMPY_COMPAT}"] if first else []
    (sp / "_held.pth").write_text("\n".join([*private, *site.getsitepackages()]) + "\n")
    return env / "bin"


def free_ports(n: int) -> list[int]:
    import socket

    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.add(s.getsockname()[1])
    return sorted(ports)


@contextmanager
def plain_tritonserver(repo: Path, models, work: Path, timeout_s: float = 180.0):
    """`tritonserver --model-repository=REPO` loading `models`, in an environment without enginesmith.
    Yields (http url, env); stops the server's whole process group on exit."""
    from enginesmith.triton_repo.discovery import find_server

    b = find_server(work / "triton-cache")
    env = {"HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(sys.executable).parent]
    if b.bundled:
        from enginesmith.triton_repo.discovery import NUMPY_GUARD_ENV

        stub = b.backend_dir / "python" / "triton_python_backend_stub"
        libs = b.env["LD_LIBRARY_PATH"]
        bin_dir = clean_stub_env(work, stub, libs, b.stub_numpy)
        env |= {"LD_LIBRARY_PATH": libs, "PATH": os.pathsep.join([str(bin_dir), *path]),
                NUMPY_GUARD_ENV: b.env[NUMPY_GUARD_ENV]}
    else:
        env["PATH"] = os.pathsep.join(path)
    http, grpc, metrics = free_ports(3)
    argv = [str(b.path), f"--model-repository={repo}", f"--http-port={http}", f"--grpc-port={grpc}",
            f"--metrics-port={metrics}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1", "--model-control-mode=explicit", *(f"--load-model={m}" for m in models),
            "--exit-timeout-secs=5", *([f"--backend-directory={b.backend_dir}"] if b.backend_dir else [])]
    log = work / "tritonserver.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RehearsalError(f"plain tritonserver did not become ready (exit {proc.poll()}):\n{tail}")
            time.sleep(0.25)
        yield url, env
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def _ready(url: str, model: str | None = None) -> bool:
    path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
    try:
        with urllib.request.urlopen(url + path, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def text_round_trip(url: str, tokenizer_dir: Path, text: str = "Hello world") -> tuple[list[int], str]:
    """One request through preprocessing (text -> ids) and one through postprocessing (ids -> text)."""
    import numpy as np
    import tritonclient.http as http

    client = http.InferenceServerClient(url.removeprefix("http://"))

    def tensor(name, arr, dtype):
        t = http.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    pre = client.infer("preprocessing", [tensor("QUERY", np.array([[text.encode()]], dtype=np.object_), "BYTES"),
                                         tensor("REQUEST_OUTPUT_LEN", np.array([[4]], dtype=np.int32), "INT32")])
    ids = [int(i) for i in pre.as_numpy("INPUT_ID").reshape(-1)]
    post = client.infer("postprocessing", [tensor("TOKENS_BATCH", np.array([[ids]], dtype=np.int32), "INT32"),
                                           tensor("SEQUENCE_LENGTH", np.array([[len(ids)]], dtype=np.int32),
                                                  "INT32")])
    return ids, post.as_numpy("OUTPUT").reshape(-1)[0].decode()


def serve_without_enginesmith(repo: Path, work: Path, report: Report) -> None:
    from transformers import AutoTokenizer

    tokenizer_dir = Path(json.loads((repo / "manifest.json").read_text())["tokenizer_dir"])
    work.mkdir(parents=True, exist_ok=True)
    with plain_tritonserver(repo, SELF_CONTAINED, work) as (url, env):
        probe = ("import importlib.util as u; print([m for m in ('enginesmith', 'triton_repo', 'builders') "
                 "if u.find_spec(m)])")
        leaked = run([Path(env["PATH"].split(os.pathsep)[0]) / "python3", "-c", probe], cwd=work, env=env).strip()
        if "stub-env" in env["PATH"] and leaked != "[]":
            raise RehearsalError(f"the stub's Python can import {leaked}: the environment is not clean")
        ids, text = text_round_trip(url, tokenizer_dir)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if ids != tok.encode("Hello world") or text != tok.decode(ids, skip_special_tokens=True):
            raise RehearsalError(f"round trip gave ids {ids} and text {text!r}")
        if not _ready(url, "tensorrt_llm_bls"):
            raise RehearsalError("tensorrt_llm_bls is not ready")
    report.say(f"serve: plain tritonserver on {repo} without enginesmith (stub Python imports neither "
               f"enginesmith nor builders): preprocessing 'Hello world' -> {ids}, postprocessing -> {text!r}; "
               "tensorrt_llm_bls ready")


# ---- 5. upstream's launch_triton_server.py beside ours ------------------------------------------------------
def _blocks(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """mpirun options before the first rank, and each rank's tokens (`-n 1 tritonserver ...`)."""
    first = argv.index("-n") if "-n" in argv else 0
    blocks, cur = [], []
    for tok in argv[first:]:
        if tok == ":":
            blocks.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        blocks.append(cur)
    return argv[:first], blocks


def compare_launch(upstream: list[str], ours: list[str]) -> list[str]:
    """Differences that matter between upstream's command and ours (empty: the same launch)."""
    diffs = []
    (up_pre, up), (our_pre, mine) = _blocks(upstream), _blocks(ours)
    if up_pre and not set(up_pre) <= set(our_pre):
        diffs.append(f"mpirun options: upstream {up_pre}, ours {our_pre}")
    if not up_pre:  # --no-mpi
        up = [upstream]
    if len(up) != len(mine):
        return diffs + [f"{len(up)} ranks upstream, {len(mine)} ours"]
    for rank, (u, o) in enumerate(zip(up, mine, strict=True)):
        u_cmd, o_cmd = (b[2:] if b[:2] == ["-n", "1"] else b for b in (u, o))
        if u_cmd[0] != o_cmd[0]:
            diffs.append(f"rank {rank}: runs {o_cmd[0]}, upstream {u_cmd[0]}")
        missing = sorted(set(u_cmd[1:]) - set(o_cmd[1:]))
        extra = sorted(f for f in set(o_cmd[1:]) - set(u_cmd[1:]) if not f.startswith(OUR_EXTRA_FLAGS))
        if missing or extra:
            diffs.append(f"rank {rank}: ours lacks {missing}, adds {extra}")
    return diffs


def command_line(args: dict) -> list[str]:
    """The launch_triton_server.py options of a recorded case (the rest are the script's defaults)."""
    argv = ["--world_size", str(args["world_size"]), "--tritonserver", args["tritonserver"], "--model_repo",
            args["model_repo"], "--grpc_port", args["grpc_port"], "--http_port", args["http_port"],
            "--metrics_port", args["metrics_port"]]
    return argv + (["--exit_timeout", str(args["exit_timeout"])] if args["exit_timeout"] else [])


def _script_keywords(module, options: list[str]) -> dict:
    """What the script's `__main__` passes to get_cmd for these options, parsed by its own parse_arguments."""
    saved = sys.argv
    sys.argv = ["launch_triton_server.py", *options]
    try:
        module.args = module.parse_arguments()  # get_cmd also reads this module global
    finally:
        sys.argv = saved
    return {name: getattr(module.args, name) for name in inspect.signature(module.get_cmd).parameters}


def _load_script(script: Path):
    spec = importlib.util.spec_from_file_location("upstream_launch_triton_server", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upstream_cases(script: Path | None = UPSTREAM_SCRIPT) -> list[dict]:
    """Recorded get_cmd cases, each re-derived from the script (None: the record alone): the case's command
    line through its argument parser, then its get_cmd, both checked against the record. A case whose options
    the script does not have (an older script without --exit_timeout) stays checked by the record alone."""
    cases = json.loads(UPSTREAM_CASES.read_text())["cases"]
    if script is None:
        return cases
    module = _load_script(script)
    params = inspect.signature(module.get_cmd).parameters
    ran = 0
    for case in cases:
        extra = {k: v for k, v in case["args"].items() if k not in params}
        if any(v not in (None, False) for v in extra.values()):
            continue  # an option this script predates
        options = command_line(case["args"])
        keywords = _script_keywords(module, options)
        recorded = {k: v for k, v in case["args"].items() if k in params}
        if keywords != recorded:
            raise RehearsalError(f"{script} parses `{' '.join(options)}` into {keywords}, not the recorded "
                                 f"{recorded}")
        got = module.get_cmd(**keywords)
        if got != case["argv"]:
            raise RehearsalError(f"{script} no longer builds the recorded command for `{' '.join(options)}`:\n"
                                 f"{got}")
        case["from_script"] = True
        ran += 1
    if not ran:
        raise RehearsalError(f"{script} takes none of the recorded cases' options")
    return cases


def launch_lines(report: Report, script: Path | None = UPSTREAM_SCRIPT) -> None:
    from enginesmith.builders.planner.plan import make_plan
    from enginesmith.builders.recipe import load_recipe
    from enginesmith.triton_repo.launch import Endpoints, build_mpirun_argv

    cases = upstream_cases(script)
    for path in engine_recipes():
        recipe = load_recipe(path)
        if recipe.build.target != "trtllm-engine":
            continue
        n = make_plan(recipe, with_options=False).mapping.world_size
        for case in (c for c in cases if c["args"]["world_size"] == n):
            a = case["args"]
            ep = Endpoints(int(a["http_port"]), int(a["grpc_port"]), int(a["metrics_port"]))
            timeout = a["exit_timeout"]
            ours = build_mpirun_argv(n, a["tritonserver"], a["model_repo"], ep, exit_timeout_s=timeout)
            diffs = compare_launch(case["argv"], ours)
            if diffs:
                raise RehearsalError(f"{path.name} world_size {n}: our launch differs from upstream's: {diffs}")
            more = f", --exit_timeout {timeout}" if timeout else ""
            source = f"run from {_shown(script)}" if case.get("from_script") else "recorded"
            report.say(f"launch: {path.name}: --world_size {n}{more}: same ranks, flags and shm prefixes as "
                       f"upstream's launch_triton_server.py ({source}); "
                       "ours also binds addresses and states each port once")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def rehearse(out: Path, upstream_script: Path | None = UPSTREAM_SCRIPT) -> Report:
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    report = Report()
    py = install(out / "env", report)
    dry_runs(py, out / "work", report)
    repo = repositories(py, out / "work", report)
    serve_without_enginesmith(repo, out / "serve", report)
    launch_lines(report, upstream_script)
    report.say("stopped where TensorRT-LLM itself runs: trtllm-build and the tensorrtllm backend need the container")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/container-check"))
    ap.add_argument("--upstream-script", type=Path, default=UPSTREAM_SCRIPT,
                    help="upstream's launch_triton_server.py whose command lines are compared (default: the copy in "
                         "tests/data/upstream-launch/, from tensorrtllm_backend; a newer one, e.g. TensorRT-LLM's "
                         "triton_backend/scripts/, runs every recorded case)")
    args = ap.parse_args(argv)
    try:
        rehearse(args.out, args.upstream_script)
    except RehearsalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
