"""A toy Triton Python model speaking the ensemble/BLS text contract (copied to <name>/1/model.py).

Not a language model: token i of a reply to an n-word prompt is " w{(n + i) % 17}", so tests can predict the
text. Its first response also carries `toy_echo`: every input it received with the numpy dtype Triton
delivered, so a test can check what a client put on the wire. Decoupled (one response per token when
`stream` is true, then a flag-only final response) or not (one response), per its config.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TIMES = ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")


def _first(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    v = t.as_numpy().reshape(-1)[0]
    return v if isinstance(v, bytes) else v.item()


def _echo(request) -> str:
    values, dtypes = {}, {}
    for t in request.inputs():
        a = t.as_numpy()
        values[t.name()] = [x.decode() for x in a.reshape(-1)] if a.dtype == object else a.tolist()
        dtypes[t.name()] = str(a.dtype)
    return json.dumps({"values": values, "dtypes": dtypes})


def _response(texts, echo=None, times=None):
    outs = [pb_utils.Tensor("text_output", np.array([["".join(texts).encode()]], dtype=object))]
    if echo is not None:
        outs.append(pb_utils.Tensor("toy_echo", np.array([[echo.encode()]], dtype=object)))
    for k, v in (times or {}).items():
        outs.append(pb_utils.Tensor(k, np.array([[v]], dtype=np.int64)))
    return pb_utils.InferenceResponse(output_tensors=outs)


class TritonPythonModel:
    def initialize(self, args):
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))

    def _generate(self, request):
        times = {"arrival_time_ns": time.monotonic_ns()}
        n = len(_first(request, "text_input", b"").decode().split())
        tokens = [f" w{(n + i) % 17}" for i in range(int(_first(request, "max_tokens", 1)))]
        times["first_scheduled_time_ns"] = times["first_token_time_ns"] = time.monotonic_ns()
        times["last_token_time_ns"] = time.monotonic_ns()
        return tokens, (times if _first(request, "return_perf_metrics", False) else None)

    def execute(self, requests):
        if not self.decoupled:
            return [_response(*self._reply(r)) for r in requests]
        for r in requests:
            tokens, times = self._generate(r)
            sender = r.get_response_sender()
            if _first(r, "stream", False):
                for i, tok in enumerate(tokens):
                    sender.send(_response([tok], _echo(r) if i == 0 else None, times))
            else:
                sender.send(_response(tokens, _echo(r), times))
            sender.send(flags=FINAL)
        return None

    def _reply(self, request):
        tokens, times = self._generate(request)
        return tokens, _echo(request), times
