"""Triton Python model `preprocessing` (copied to preprocessing/1/model.py): text -> token tensors.

Upstream's tensor contract over a local Hugging Face tokenizer: QUERY is tokenized (special tokens per
`add_special_tokens`, default true), stop / bad words are packed as [batch, 2, n], END_ID / PAD_ID default
to the tokenizer's eos / pad (pad falls back to eos). Decoder-only models get upstream's placeholder decoder
input (one pad token). Multimodal inputs and prompt-table ids are refused with a clear error.
A bad request gets an error response; the other requests of the batch are served.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

# The repository holds its own copy of these modules beside this file (triton_repo/repository.py):
# put it first, so the models run without enginesmith installed and never mix with another version.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from enginesmith.triton_repo.models.model_args import (
    ModelArgsError,
    check_stub_numpy,
    load_tokenizer,
    param_bool,
    param_str,
    read_parameters,
    special_id,
)
from enginesmith.triton_repo.text_tensors import (
    RequestInputError,
    embedding_bias,
    encode_prompts,
    ids_per_row,
    output_lengths,
    texts,
    word_lists,
)

UNSUPPORTED = ("IMAGE_BYTES", "IMAGE_URL", "IMAGE_SIZES", "VIDEO_BYTES", "PROMPT_TABLE_EXTRA_ID")


def _get(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        try:
            check_stub_numpy()
            params = read_parameters(args)
            self.add_special_tokens = param_bool(params, "add_special_tokens", True)
            if param_str(params, "multimodal_model_path"):
                raise ModelArgsError("multimodal_model_path is set, but enginesmith's preprocessing is text-only")
            self.tokenizer = load_tokenizer(param_str(params, "tokenizer_dir"))
        except ModelArgsError as e:
            raise pb_utils.TritonModelException(f"preprocessing: {e}") from None
        self.end_id = special_id(self.tokenizer, self.tokenizer.eos_token)
        self.pad_id = special_id(self.tokenizer, self.tokenizer.pad_token)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._tensors(request)))
            except RequestInputError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"preprocessing: {e}", pb_utils.TritonError.INVALID_ARG)))
        return responses

    def _tensors(self, request) -> list:
        for name in UNSUPPORTED:
            value = _get(request, name)
            if value is not None and value.size:
                raise RequestInputError(f"{name} is not supported: enginesmith serves text-only models")
        query = [row[0] for row in texts(_get(request, "QUERY"), "QUERY (text_input)")]
        batch = len(query)
        end_id = ids_per_row(_get(request, "END_ID"), self.end_id, batch)
        pad_id = ids_per_row(_get(request, "PAD_ID"), self.pad_id, batch)
        input_ids, input_lens = encode_prompts(self.tokenizer, query, self.add_special_tokens, int(pad_id[0, 0]),
                                               "QUERY (text_input)")
        decoder = _get(request, "DECODER_QUERY")
        if decoder is not None:
            dec_text = [row[0] for row in texts(decoder, "DECODER_QUERY")]
            dec_ids, dec_lens = encode_prompts(self.tokenizer, dec_text, self.add_special_tokens,
                                               int(pad_id[0, 0]), "DECODER_QUERY")
        else:  # upstream's placeholder for decoder-only models
            dec_ids, dec_lens = pad_id.copy(), np.ones((batch, 1), dtype=np.int32)
        words = {n: _get(request, n) for n in ("BAD_WORDS_DICT", "STOP_WORDS_DICT", "EMBEDDING_BIAS_WORDS")}
        words = {n: None if v is None else texts(v, n) for n, v in words.items()}
        bias = embedding_bias(self.tokenizer, words["EMBEDDING_BIAS_WORDS"], _get(request, "EMBEDDING_BIAS_WEIGHTS"),
                              batch)
        out = {
            "INPUT_ID": input_ids, "REQUEST_INPUT_LEN": input_lens,
            "DECODER_INPUT_ID": dec_ids, "REQUEST_DECODER_INPUT_LEN": dec_lens,
            "BAD_WORDS_IDS": word_lists(self.tokenizer, words["BAD_WORDS_DICT"], batch),
            "STOP_WORDS_IDS": word_lists(self.tokenizer, words["STOP_WORDS_DICT"], batch),
            "EMBEDDING_BIAS": bias,
            "REQUEST_OUTPUT_LEN": output_lengths(_get(request, "REQUEST_OUTPUT_LEN")),
            "OUT_END_ID": end_id, "OUT_PAD_ID": pad_id,
        }
        return [pb_utils.Tensor(name, value) for name, value in out.items()]
