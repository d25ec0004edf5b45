"""A real tritonserver (triton_repo.server.TritonServer on free 127.0.0.1 ports) serving toy text models.

`tests/client_toy_model.py` speaks the ensemble/BLS text contract and echoes what it received, so
test_client_toy.py can check each sampling parameter's name and dtype on the wire, and exercise gRPC unary
on a non-decoupled model (a streaming deployment of the real model has none). Everything else runs against
the real served tiny model (tests/client_served.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent

_OPTIONAL_TEXT_INPUTS = [
    ("stream", "TYPE_BOOL"), ("end_id", "TYPE_INT32"), ("pad_id", "TYPE_INT32"), ("top_k", "TYPE_INT32"),
    ("top_p", "TYPE_FP32"), ("temperature", "TYPE_FP32"), ("length_penalty", "TYPE_FP32"),
    ("repetition_penalty", "TYPE_FP32"), ("min_tokens", "TYPE_INT32"), ("presence_penalty", "TYPE_FP32"),
    ("frequency_penalty", "TYPE_FP32"), ("seed", "TYPE_UINT64"), ("beam_width", "TYPE_INT32"),
    ("exclude_input_in_output", "TYPE_BOOL"), ("return_log_probs", "TYPE_BOOL"),
    ("return_perf_metrics", "TYPE_BOOL"),
]
_TIME_OUTPUTS = ["arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns"]


def _tensor(name: str, dtype: str, dims: str, optional: bool) -> str:
    opt = "  optional: true\n" if optional else ""
    return f"{{\n  name: \"{name}\"\n  data_type: {dtype}\n  dims: [ {dims} ]\n{opt}}}"


def toy_config(name: str, decoupled: bool) -> str:
    """config.pbtxt with the ensemble's text inputs (batched, max_batch_size 8) plus a `toy_echo` output."""
    ins = [_tensor("text_input", "TYPE_STRING", "1", False), _tensor("max_tokens", "TYPE_INT32", "1", False)]
    ins += [_tensor(n, t, "1", True) for n, t in _OPTIONAL_TEXT_INPUTS]
    ins += [_tensor(n, "TYPE_STRING", "-1", True) for n in ("stop_words", "bad_words")]
    outs = [_tensor("text_output", "TYPE_STRING", "-1", False), _tensor("toy_echo", "TYPE_STRING", "-1", False)]
    outs += [_tensor(n, "TYPE_INT64", "1", False) for n in _TIME_OUTPUTS]
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n'
            f"model_transaction_policy {{ decoupled: {'true' if decoupled else 'false'} }}\n"
            f"input [\n{','.join(ins)}\n]\noutput [\n{','.join(outs)}\n]\n"
            "instance_group [ { count: 1 kind: KIND_CPU } ]\n")


@dataclass
class ToyModel:
    name: str
    decoupled: bool = True

    def write(self, repo: Path) -> None:
        d = repo / self.name
        (d / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(_HERE / "client_toy_model.py", d / "1" / "model.py")
        (d / "config.pbtxt").write_text(toy_config(self.name, self.decoupled))


class ToyServer:
    """The toy models in `<root>/repo`, served by a real tritonserver; start() / stop()."""

    def __init__(self, root: Path, models: list[ToyModel]):
        from enginesmith.triton_repo.server import TritonServer

        self.root, self.repo = root, root / "repo"
        self.repo.mkdir(parents=True, exist_ok=True)
        for m in models:
            m.write(self.repo)
        self.server = TritonServer(self.repo, log_path=root / "server.log")

    @property
    def http_url(self) -> str:
        return self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    def start(self) -> ToyServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
