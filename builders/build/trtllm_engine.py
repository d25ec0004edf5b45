"""The only module that runs TensorRT-LLM: `trtllm-build`, whole or for a subset of ranks.

All ranks: the exact `trtllm-build ...` command from `builders.build.flags`.
Some ranks (one node of a multi-node layout): `python -m enginesmith.builders.build.trtllm_engine --ranks 2,3 --
trtllm-build ...` runs trtllm-build's own `main()` with the same arguments, replacing only its
`parallel_build` loop by one over the chosen ranks (rank r on local GPU i % workers). The engine
config.json, which upstream writes only from rank 0, is written from the first chosen rank.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

from enginesmith.builders.build.flags import TRTLLM_BUILD, BuildCommand, shell_line

PINNED_VERSION = "1.2.1"
INSTALL_HELP = f"""TensorRT-LLM is not installed here, so the engines cannot be built on this machine.
Install the pinned version (the last stable line that still ships trtllm-build) from NVIDIA's index:
    pip install tensorrt-llm=={PINNED_VERSION} --extra-index-url https://pypi.nvidia.com
or run enginesmith inside NVIDIA's NGC TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release)
of that version, on a machine with the target GPU.
`enginesmith build RECIPE --dry-run` prints the exact trtllm-build commands without building."""


class TensorRTLLMUnavailable(RuntimeError):
    """TensorRT-LLM (or its trtllm-build) is missing; the message says how to install it."""


def trtllm_importable() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def require_trtllm() -> None:
    """Raise TensorRTLLMUnavailable unless both the package and the trtllm-build executable exist."""
    if not trtllm_importable():
        on_path = shutil.which(TRTLLM_BUILD)
        hint = (f"\n`{TRTLLM_BUILD}` is on PATH ({on_path}) but {sys.executable} cannot import tensorrt_llm: an "
                "isolated venv hides the container's packages; in the container run `make venv` again (it builds "
                "the venv over the Python that has torch and TensorRT-LLM)") if on_path else ""
        raise TensorRTLLMUnavailable(INSTALL_HELP + hint)
    if shutil.which(TRTLLM_BUILD) is None:
        raise TensorRTLLMUnavailable(
            f"tensorrt_llm is importable but `{TRTLLM_BUILD}` is not on PATH; TensorRT-LLM 1.3.0rc21 and later "
            f"removed it. Install tensorrt-llm=={PINNED_VERSION}.\n" + INSTALL_HELP)


def runner_argv(cmd: BuildCommand, python: str = "python") -> list[str]:
    """What actually runs for `cmd`: trtllm-build itself, or this module for a subset of ranks."""
    if cmd.all_ranks:
        return list(cmd.argv)
    ranks = ",".join(str(r) for r in cmd.ranks)
    return [python, "-m", "enginesmith.builders.build.trtllm_engine", "--ranks", ranks, "--", *cmd.argv]


def run_build(cmd: BuildCommand) -> None:
    """Run one build command (raises TensorRTLLMUnavailable / CalledProcessError)."""
    require_trtllm()
    argv = runner_argv(cmd, python=sys.executable)
    print(f"$ {shell_line(argv)}", flush=True)
    subprocess.run(argv, check=True)


def _build_subset(ranks: list[int], trtllm_args: list[str]) -> None:  # pragma: no cover - needs TensorRT-LLM
    """Run trtllm-build's main() with its rank loop restricted to `ranks`."""
    import json
    import os

    import tensorrt_llm.builder as builder
    import tensorrt_llm.commands.build as upstream
    import torch

    encoder = getattr(builder, "ConfigEncoder", None)

    def build_one(rank, gpu_id, ckpt_dir, build_config, output_dir, log_level, model_config, model_cls, **kwargs):
        torch.cuda.set_device(gpu_id)
        upstream.logger.set_level(log_level)
        engine = upstream.build_model(build_config, rank, ckpt_dir, model_config, model_cls=model_cls, **kwargs)
        engine.save(output_dir)  # writes config.json only for rank 0
        if rank == ranks[0] and rank != 0:  # the config is rank-independent (mapping.to_dict drops rank)
            with open(os.path.join(output_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump(engine.config.to_dict(), f, indent=4, cls=encoder, default=None if encoder else str)

    def parallel_build(model_config, ckpt_dir, build_config, output_dir, workers=1, log_level="info",
                       model_cls=None, **kwargs):
        for i, rank in enumerate(ranks):
            build_one(rank, i % max(workers, 1), ckpt_dir, build_config, output_dir, log_level,
                      model_config, model_cls, **kwargs)

    upstream.parallel_build = parallel_build
    sys.argv = [TRTLLM_BUILD, *trtllm_args]
    upstream.main()


def _main(argv: list[str]) -> None:  # pragma: no cover - needs TensorRT-LLM
    if len(argv) < 4 or argv[0] != "--ranks" or argv[2] != "--" or argv[3] != TRTLLM_BUILD:
        raise SystemExit("usage: python -m enginesmith.builders.build.trtllm_engine --ranks 2,3 -- "
                         "trtllm-build ARGS...")
    _build_subset([int(r) for r in argv[1].split(",")], argv[4:])


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1:])
