"""Triton Python model `tensorrt_llm_bls` (copied to tensorrt_llm_bls/1/model.py): the ensemble as BLS calls.

preprocessing -> tensorrt_llm -> postprocessing, wired exactly as the ensemble (triton_repo.model_config
tables), with upstream's text-level tensor contract. When `stream` is set (decoupled model), each
tensorrt_llm response is detokenized incrementally here, per (batch row, beam), through stateless calls to
the postprocessing model: no space is lost and no UTF-8 character is split, whatever the postprocessing
instance count. `accumulate_tokens: true` sends the whole text so far in each response (upstream's mode);
the default sends deltas. A cancelled request stops its generation with upstream's stop request.
"""

from __future__ import annotations

import os
import sys
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

# The repository holds its own copy of these modules beside this file (triton_repo/repository.py):
# put it first, so the models run without enginesmith installed and never mix with another version.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from enginesmith.triton_repo.detokenize import WHOLE, IncrementalDetokenizer
from enginesmith.triton_repo.model_config import PREPROCESSING_IN, PREPROCESSING_OUT, TENSORRT_LLM_IN
from enginesmith.triton_repo.models.model_args import (ModelArgsError, check_stub_numpy, param_bool, param_str,
                                                       read_parameters)
from enginesmith.triton_repo.tensor_specs import PASSTHROUGH_OUTPUTS
from enginesmith.triton_repo.text_tensors import text_array, token_rows

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
UNSUPPORTED = ("image_input", "image_bytes_input", "image_url_input", "image_sizes_input", "video_bytes_input",
               "num_draft_tokens", "use_draft_logits")
PRE_OUTPUT_OF = {ens: pre for pre, ens in PREPROCESSING_OUT}  # ensemble tensor -> preprocessing output
LLM_OUTPUTS = ["output_ids", "sequence_length", *(s.name for s in PASSTHROUGH_OUTPUTS)]


class BlsError(RuntimeError):
    """A step failed or the request is invalid; the message (and Triton error code) go back to the client."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = pb_utils.TritonError.INVALID_ARG if code is None else code


def step_message(model: str, message: str) -> str:
    """A step's error, named by its model once (preprocessing's own messages start with its name)."""
    return message if message.startswith(f"{model}: ") else f"{model}: {message}"


def _column(arr: np.ndarray) -> np.ndarray:
    """A reshaped scalar input ([batch]) back to the [batch, 1] tensorrt_llm expects."""
    return arr.reshape(-1, 1) if arr.ndim == 1 else arr


class TritonPythonModel:
    def initialize(self, args):
        import json

        config = json.loads(args["model_config"])
        try:
            check_stub_numpy()
            params = read_parameters(args)
            self.accumulate = param_bool(params, "accumulate_tokens", False)
            self.llm = param_str(params, "tensorrt_llm_model_name", "tensorrt_llm")
            for key in ("tensorrt_llm_draft_model_name", "multimodal_encoders_name"):
                if param_str(params, key):
                    raise ModelArgsError(f"{key} is set, but enginesmith's BLS has no speculative or multimodal path")
        except ModelArgsError as e:
            raise pb_utils.TritonModelException(f"tensorrt_llm_bls: {e}") from None
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_batch = max(1, int(config.get("max_batch_size", 1)))
        self.output_names = {o["name"] for o in config["output"]}

    def execute(self, requests):
        if not self.decoupled:
            return [self._single(request) for request in requests]
        for request in requests:
            sender = request.get_response_sender()
            try:
                for response in self._generate(request):
                    sender.send(response)
                sender.send(flags=FINAL)
            except Exception as e:  # noqa: BLE001 - every request must get its final response
                try:
                    sender.send(self._error(e), flags=FINAL)
                except Exception as send_error:  # noqa: BLE001 - e.g. the client has gone; serve the others
                    pb_utils.Logger.log_warn(f"tensorrt_llm_bls: cannot answer a request ({e}): {send_error}")
        return None

    def _single(self, request):
        try:
            responses = list(self._generate(request))
            return responses[-1] if responses else self._error(
                BlsError(f"{self.llm} returned no output", pb_utils.TritonError.INTERNAL))
        except Exception as e:  # noqa: BLE001
            return self._error(e)

    @staticmethod
    def _error(e: Exception):
        if isinstance(e, BlsError):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), e.code))
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(
            f"tensorrt_llm_bls internal error: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL))

    # ---- the pipeline ---------------------------------------------------------------------------------
    def _generate(self, request):
        inputs = {t.name(): t.as_numpy() for t in request.inputs()}
        for name in UNSUPPORTED:
            if name in inputs and inputs[name].size:
                raise BlsError(f"tensorrt_llm_bls: {name} is not supported (text-only, no speculative decoding)")
        stream = bool(np.any(inputs.get("stream", False)))
        if stream and not self.decoupled:
            raise BlsError("tensorrt_llm_bls: stream=true needs the model to be decoupled "
                           "(serve.decoupled: true in the recipe)")
        pre = self._call("preprocessing", {p: inputs[e] for p, e in PREPROCESSING_IN if e in inputs},
                         [p for p, _ in PREPROCESSING_OUT])
        pre_out = {}
        for name, _ in PREPROCESSING_OUT:
            tensor = pb_utils.get_output_tensor_by_name(pre, name)
            if tensor is not None:
                pre_out[name] = tensor.as_numpy()
        llm_inputs = {}
        for key, source in TENSORRT_LLM_IN:
            value = pre_out.get(PRE_OUTPUT_OF.get(source, "")) if source.startswith("_") else inputs.get(source)
            if value is not None:
                llm_inputs[key] = _column(value)
        llm_id = f"bls-{uuid.uuid4().hex}"
        responses = self._call(self.llm, llm_inputs, LLM_OUTPUTS, decoupled=self.decoupled, request_id=llm_id)
        yield from self._texts(request, responses if self.decoupled else [responses], stream, llm_id)

    def _texts(self, request, responses, stream: bool, llm_id: str):
        detoks: dict[tuple[int, int], IncrementalDetokenizer] = {}
        sent: dict[tuple[int, int], str] = {}
        last: dict[tuple[int, int], object] = {}
        """(row, beam) -> its last tensorrt_llm response, whose other outputs go with the held-back tail."""
        stopped = False
        for resp in responses:
            if resp.has_error():
                raise BlsError(step_message(self.llm, resp.error().message()), resp.error().code())
            if not stopped and request.is_cancelled():
                self._stop(llm_id)
                stopped = True
            ids = pb_utils.get_output_tensor_by_name(resp, "output_ids")
            if ids is None or stopped:
                continue
            rows = token_rows(ids.as_numpy(), pb_utils.get_output_tensor_by_name(resp, "sequence_length").as_numpy())
            index = pb_utils.get_output_tensor_by_name(resp, "batch_index")
            first = int(index.as_numpy().reshape(-1)[0]) if index is not None and len(rows) == 1 else 0
            beams = [(first + b, k, beam) for b, row in enumerate(rows) for k, beam in enumerate(row)]
            if not stream:
                yield self._response(self._decode([beam for _, _, beam in beams]), resp)
                continue
            texts = [self._delta(detoks, sent, (b, k), beam) for b, k, beam in beams]
            last.update({(b, k): resp for b, k, _ in beams})
            if any(beam for _, _, beam in beams) or any(texts):
                yield self._response(texts, resp)  # (a final response without tokens: its tail follows)
        for key in [] if stopped else sorted(detoks):
            if tail := detoks[key].flush():
                yield self._response([sent[key] + tail if self.accumulate else tail], last[key])

    def _delta(self, detoks, sent, key, tokens) -> str:
        det = detoks.setdefault(key, IncrementalDetokenizer(self._decode))
        delta = det.push(tokens)
        sent[key] = sent.get(key, "") + delta
        return sent[key] if self.accumulate else delta

    def _response(self, texts: list[str], llm_response):
        """text_output [batch * beam] as upstream's BLS returns it, with tensorrt_llm's other outputs."""
        tensors = [pb_utils.Tensor("text_output", text_array(texts))]
        for spec in PASSTHROUGH_OUTPUTS:
            tensor = pb_utils.get_output_tensor_by_name(llm_response, spec.name)
            if tensor is not None and spec.name in self.output_names:
                tensors.append(pb_utils.Tensor(spec.name, tensor.as_numpy()))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    # ---- BLS calls ------------------------------------------------------------------------------------
    def _call(self, model: str, inputs: dict, outputs: list[str], decoupled: bool = False, request_id: str = "",
              parameters: dict | None = None):
        req = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, request_id=request_id,
                                        inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
                                        parameters=parameters or {})
        if decoupled:
            return req.exec(decoupled=True)
        resp = req.exec()
        if resp.has_error():
            raise BlsError(step_message(model, resp.error().message()), resp.error().code())
        return resp

    def _decode(self, seqs: list[list[int]]) -> list[str]:
        """Stateless detokenization through the postprocessing model (each sequence decoded as a whole)."""
        out: list[str] = []
        for i in range(0, len(seqs), self.max_batch):
            chunk = seqs[i:i + self.max_batch]
            width = max(len(s) for s in chunk)
            if width == 0:
                out += [""] * len(chunk)
                continue
            tokens = np.zeros((len(chunk), 1, width), dtype=np.int32)
            for b, s in enumerate(chunk):
                tokens[b, 0, :len(s)] = s
            lengths = np.array([[len(s)] for s in chunk], dtype=np.int32)
            resp = self._call("postprocessing", {"TOKENS_BATCH": tokens, "SEQUENCE_LENGTH": lengths}, ["OUTPUT"],
                              parameters={WHOLE: True})
            text = pb_utils.get_output_tensor_by_name(resp, "OUTPUT").as_numpy()
            out += [t.decode("utf-8") for t in text.reshape(-1)]
        return out

    def _stop(self, llm_id: str) -> None:
        """Upstream's stop request: same request id, stop=true; frees the sequence's KV blocks."""
        if not self.decoupled:
            return
        one = lambda v, t: np.array([[v]], dtype=t)  # noqa: E731
        stop = {"input_ids": one(0, np.int32), "input_lengths": one(0, np.int32),
                "request_output_len": one(0, np.int32), "stop": one(True, np.bool_)}
        for resp in self._call(self.llm, stop, ["output_ids"], decoupled=True, request_id=llm_id):
            if resp.has_error():
                pb_utils.Logger.log_warn(f"tensorrt_llm_bls: stop request {llm_id} failed: {resp.error().message()}")
