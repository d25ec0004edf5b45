# enginesmith: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ES := $(VENV)/bin/enginesmith
# On the CPU machines here, torch==2.13.0 resolves to a local CPU wheel; override for a GPU box.
TORCH_SPEC ?= torch==2.13.0
OUT ?= out
# numpy 2, as the GPU machines' images and most environments have it (nvidia-pytriton declares numpy<2 for its
# Python-backend stub only; enginesmith gives the stubs a private numpy 1.x, see triton_repo/discovery.py).
# Not installed over a base that has torch: there the base's numpy is kept (a constraint, as below).
# Below 2.4: Triton 3.6's CPU interpreter (the kernel tests' second pass) fails under numpy 2.4's scalar rules.
NUMPY_SPEC ?= numpy>=2,<2.4
# Extra pip flags (e.g. --no-index --no-build-isolation for an offline install).
PIP_FLAGS ?=
# Rich tables (plans, bench results) fall back to 80 columns when not on a terminal; give them room.
export COLUMNS ?= 150

# When $(PYTHON) already imports torch (NVIDIA's tritonserver:<yy.mm>-trtllm-python-py3 or TensorRT-LLM
# containers), the venv is made over it: it sees that Python's site-packages (a .pth file: works for a system
# Python and for a venv or conda base alike), torch is not installed, and pip may not replace what the base
# holds (torch, TensorRT-LLM, Triton-lang, transformers, tokenizers, numpy: pinned as constraints); the
# install ends by checking that and printing the TensorRT-LLM found. The client extra replaces serve there
# (the container has its own tritonserver); kernels (the Triton-lang pin for the CPU interpreter) is left out.
BASE_HAS_TORCH := $(shell $(PYTHON) builders/base_env.py has-torch 2>/dev/null)
ifeq ($(BASE_HAS_TORCH),yes)
EXTRAS ?= torch,client,dev
else
EXTRAS ?= torch,serve,dev,kernels
endif

.PHONY: venv test lint plan-all clean demo check-container

$(VENV)/.stamp: pyproject.toml
ifeq ($(BASE_HAS_TORCH),yes)
	$(PYTHON) -m venv --without-pip $(VENV)   # pip (and the build tools) come from the base
	$(PYTHON) builders/base_env.py pth > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_enginesmith_base.pth"
	$(PYTHON) builders/base_env.py constraints > $(VENV)/base-constraints.txt
	$(PY) -m pip install -q $(PIP_FLAGS) -c $(VENV)/base-constraints.txt -e ".[$(EXTRAS)]"
	$(PY) builders/base_env.py report $(VENV)/base-constraints.txt
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install -q $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_FLAGS) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q $(PIP_FLAGS) --no-warn-conflicts "$(NUMPY_SPEC)"
endif
	touch $@

venv: $(VENV)/.stamp

KERNEL_TESTS = tests/test_gemv_decode.py tests/test_gemm_rows.py tests/test_moe_rows.py tests/test_decode_kernels.py tests/test_tp_exchange.py
# The interpreter pass proves each kernel's arithmetic once per code path: of the attention split/merge grid it keeps
# one split and one merge case, of the two-rank exchange step the dense model (the MoE one differs only in the
# blocks between exchanges, which the single-rank MoE tests cover); the GPU runs the whole grid.
INTERPRETER_SKIP = $(foreach c,64-None-True 128-32-False 128-None-False 64-32-True 128-32-True 64-None-False,\
	--deselect "tests/test_decode_kernels.py::test_triton_attention_split_and_merge_paths_match_gather[$(c)]") \
	--deselect "tests/test_tp_exchange.py::test_two_ranks_step_through_the_exchange_like_the_collective_path_and_tp1[mixtral]"

# The interpreter pass (one CPU-bound process) runs beside the main suite, whose servers and subprocesses leave
# about one of two cores idle on average; its report follows the main one. Either failing fails the target.
INTERPRETER_LOG = $(OUT)/interpreter-tests.log
# The main pass in TEST_WORKERS processes, a test file each at a time (pytest-xdist): most tests wait on servers,
# subprocesses and sockets; two of them beside the interpreter pass keep two cores busy.
TEST_WORKERS ?= 2
test: venv
	@mkdir -p $(OUT)
	@TRITON_INTERPRET=1 $(PY) -m pytest -q -rs -p no:cacheprovider --basetemp=$(OUT)/.interpreter-tmp \
		-W ignore::DeprecationWarning $(KERNEL_TESTS) $(INTERPRETER_SKIP) > $(INTERPRETER_LOG) 2>&1 & \
	interp=$$!; \
	$(PY) -m pytest -q -rs --durations=15 -n $(TEST_WORKERS) --dist loadfile tests; main=$$?; \
	wait $$interp; kernels=$$?; \
	echo "Triton kernels on CPU under Triton's interpreter (skipped above without a GPU; ran beside it):"; \
	cat $(INTERPRETER_LOG); \
	test $$main -eq 0 -a $$kernels -eq 0

lint: venv
	$(VENV)/bin/ruff check enginesmith builders runtime triton_repo client tests benchmarks

plan-all: venv
	@for r in recipes/*.yaml; do echo "== $$r"; $(ES) plan $$r || exit 1; done

clean:
	rm -rf $(OUT)

# The main job end to end on the embedded default: the tiny local llama (random weights, local tokenizer),
# plan -> convert (skipped when up to date) -> build (reference) -> repo -> a real
# tritonserver (bundled in nvidia-pytriton) -> one request streamed through the ensemble -> server stopped.
demo: convert-tiny-llama
	$(ES) plan recipes/tiny-llama.yaml
	$(ES) build recipes/tiny-llama.yaml --out $(OUT)
	$(ES) repo recipes/tiny-llama.yaml --out $(OUT)
	$(ES) demo recipes/tiny-llama.yaml --out $(OUT)

# Download + convert one recipe into $(OUT)/<name>/checkpoint (`make convert-tiny-llama`); the tiny recipes'
# random model (out/tiny-<arch>-hf) is created first when missing.
convert-%: venv
	@if [ "$(findstring tiny-,$*)" = "tiny-" ] && [ ! -f out/$*-hf/config.json ]; then \
		$(ES) tiny-model out/$*-hf --arch $(patsubst tiny-%,%,$*); fi
	$(ES) convert recipes/$*.yaml --out $(OUT)

# Reference deployments: plan -> download + convert (`enginesmith convert` fetches the weights first: it needs
# network access and the real checkpoints, 26-282 GB) -> build -> repo. On a machine without TensorRT-LLM the
# build step prints the exact trtllm-build commands, then stops with install instructions.
# DRY_RUN=1 needs no weights, GPU or TensorRT-LLM: it prints the plan and the explained build commands only.
.PHONY: build-13b-tp build-70b-pp build-moe-ep
build-13b-tp: REF_RECIPE := recipes/llama2-13b-tp2-24gb.yaml
build-70b-pp: REF_RECIPE := recipes/llama3-70b-tp2-pp2.yaml
build-moe-ep: REF_RECIPE := recipes/mixtral-8x22b-16xa100.yaml
# Multi-node layouts (build-70b-pp: 2 nodes) print what each node runs: with a shared filesystem this target
# on node 0 does it all; with a directory per node (at the same path) each node runs convert/build/repo --ranks.
build-13b-tp build-70b-pp build-moe-ep: venv
	$(ES) plan $(REF_RECIPE)
ifdef DRY_RUN
	$(ES) build $(REF_RECIPE) --out $(OUT) --dry-run --explain
else
	$(ES) build $(REF_RECIPE) --out $(OUT) --dry-run
	$(ES) convert $(REF_RECIPE) --out $(OUT)
	$(ES) build $(REF_RECIPE) --out $(OUT)
	$(ES) repo $(REF_RECIPE) --out $(OUT)
endif

# Load sweep on the demo deployment (recipes/tiny-llama.yaml, reference runtime): builds what is missing,
# serves its repository on free 127.0.0.1 ports for the run, and writes the per-point JSON (vLLM field
# names), bench.json, the PNG plots and analysis.md into $(OUT)/tiny-llama/bench/.
BENCH_ARGS ?= --concurrency 1,2,4,8 --num-prompts 32
.PHONY: bench
bench: convert-tiny-llama
	$(ES) build recipes/tiny-llama.yaml --out $(OUT)
	$(ES) repo recipes/tiny-llama.yaml --out $(OUT)
	$(ES) bench recipes/tiny-llama.yaml --out $(OUT) --serve $(BENCH_ARGS)

# Rehearse on this machine what a user of NVIDIA's Triton TensorRT-LLM container does, up to where TensorRT-LLM
# itself runs (tests/container_rehearsal.py): make venv over a Python that already has torch (offline, nothing
# reinstalled), plan / convert / build dry runs, repositories over stand-in engine directories (one directory and
# per node), pre/post/BLS on a plain tritonserver whose Python has no enginesmith, and upstream's
# launch_triton_server.py (vendored in tests/data/upstream-launch/; UPSTREAM_LAUNCH_SCRIPT=path runs another
# copy) beside ours.
# It builds no engine. About a minute on 2 cores.
check-container: venv
	$(PY) -m tests.container_rehearsal --out $(OUT)/container-check $(if $(UPSTREAM_LAUNCH_SCRIPT),--upstream-script $(UPSTREAM_LAUNCH_SCRIPT))
