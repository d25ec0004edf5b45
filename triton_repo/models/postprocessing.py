"""Triton Python model `postprocessing` (copied to postprocessing/1/model.py): token ids -> text.

Upstream's contract (TOKENS_BATCH [batch, beam, len], SEQUENCE_LENGTH [batch, beam] -> OUTPUT [batch, beam])
over a local Hugging Face tokenizer. A request that carries a request id is detokenized incrementally
per (request id, row, beam): in the ensemble every streamed tensorrt_llm response reaches us as its own
request with the client's id, and decoding each one alone would drop SentencePiece spaces and split
multi-byte UTF-8 characters (upstream's streaming bug). Requests without an id (e.g. the BLS's own
calls) are decoded as a whole. Requests are handled in arrival order, so a stream's chunks stay ordered.
"""

from __future__ import annotations

import os
import sys

import triton_python_backend_utils as pb_utils

# The repository holds its own copy of these modules beside this file (triton_repo/repository.py):
# put it first, so the models run without enginesmith installed and never mix with another version.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from triton_repo.detokenize import StreamDetokenizers
from triton_repo.models.model_args import (
    ModelArgsError,
    check_stub_numpy,
    load_tokenizer,
    param_bool,
    param_str,
    read_parameters,
)
from triton_repo.text_tensors import text_array, token_rows


class TritonPythonModel:
    def initialize(self, args):
        try:
            check_stub_numpy()
            params = read_parameters(args)
            skip = param_bool(params, "skip_special_tokens", True)
            tokenizer = load_tokenizer(param_str(params, "tokenizer_dir"))
        except ModelArgsError as e:
            raise pb_utils.TritonModelException(f"postprocessing: {e}") from None

        def decode(seqs: list[list[int]]) -> list[str]:
            return tokenizer.batch_decode(seqs, skip_special_tokens=skip)

        self.streams = StreamDetokenizers(decode)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
                rows = token_rows(tokens, lengths)
                rid = request.request_id()
                text = [[self.streams.text(f"{rid}\x00{b}\x00{k}" if rid else "", beam)
                         for k, beam in enumerate(row)] for b, row in enumerate(rows)]
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", text_array(text))]))
            except (ValueError, IndexError) as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"postprocessing: cannot detokenize: {e}", pb_utils.TritonError.INVALID_ARG)))
        return responses
