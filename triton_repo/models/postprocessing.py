"""Triton Python model `postprocessing` (copied to postprocessing/1/model.py): token ids -> text.

Upstream's contract: TOKENS_BATCH [batch, beam, len] and SEQUENCE_LENGTH [batch, beam] in, OUTPUT
[batch * beam] out (one string per row and beam, flattened as upstream's model returns it), over a local
Hugging Face tokenizer. A chunk that the reference tensorrt_llm model streamed to an ensemble request is
found in the server's stream ledger (triton_repo/detokenize.py) and detokenized incrementally with its
stream's state (kept in the ledger, so every instance sees it), so no SentencePiece space is lost and no
UTF-8 character is split, whatever ids clients send. Everything else (a whole, non-streamed sequence, the
BLS's calls, any chunk of the C++ backend, which keeps no ledger) is decoded on its own, as upstream does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from contextlib import nullcontext

import triton_python_backend_utils as pb_utils

# The repository holds its own copy of these modules beside this file (triton_repo/repository.py):
# put it first, so the models run without enginesmith installed and never mix with another version.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from enginesmith.triton_repo.detokenize import WHOLE, LedgerReader, server_ledger_path, stream_key
from enginesmith.triton_repo.models.model_args import (
    ModelArgsError,
    check_stub_numpy,
    load_tokenizer,
    param_bool,
    param_str,
    read_parameters,
)
from enginesmith.triton_repo.text_tensors import text_array, token_rows

class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        try:
            check_stub_numpy()
            params = read_parameters(args)
            skip = param_bool(params, "skip_special_tokens", True)
            tokenizer = load_tokenizer(param_str(params, "tokenizer_dir"))
        except ModelArgsError as e:
            raise pb_utils.TritonModelException(f"postprocessing: {e}") from None

        def decode(seqs: list[list[int]]) -> list[str]:
            return tokenizer.batch_decode(seqs, skip_special_tokens=skip)

        self.decode = decode
        self.ledger_path = server_ledger_path()
        self.ledger: LedgerReader | None = None
        self.ledger_inode: int | None = None
        self.ordered = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) > 1

    def _ledger(self) -> LedgerReader | None:
        """The reference tensorrt_llm model's ledger, once it exists (the C++ backend keeps none); a new one
        when tensorrt_llm was loaded again (a new file)."""
        try:
            inode = os.stat(self.ledger_path).st_ino
        except OSError:
            inode = None
        if self.ledger is not None and inode == self.ledger_inode:
            return self.ledger
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if inode is not None:
            try:
                self.ledger, self.ledger_inode = LedgerReader(self.ledger_path, ordered=self.ordered), inode
            except sqlite3.Error as e:
                pb_utils.Logger.log_warn(f"postprocessing: cannot open the stream ledger {self.ledger_path}: {e}")
        return self.ledger

    def execute(self, requests):
        ledger = self._ledger()
        with ledger.executing() if ledger is not None else nullcontext():
            return [self._respond(request, ledger) for request in requests]

    def _respond(self, request, ledger: LedgerReader | None):
        try:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            rows = token_rows(tokens, lengths)
            text = None
            if ledger is not None and len(rows) == 1 and len(rows[0]) == 1 and not _whole(request):
                key = stream_key(request.request_id(), request.correlation_id())
                try:
                    text = ledger.take(key, rows[0][0], self.decode)
                except sqlite3.Error as e:  # the text of this chunk alone, rather than no answer
                    pb_utils.Logger.log_warn(f"postprocessing: stream ledger unavailable: {e}")
            texts = [text] if text is not None else self.decode([beam for row in rows for beam in row])
            return pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", text_array(texts))])
        except (ValueError, IndexError) as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"postprocessing: cannot detokenize: {e}", pb_utils.TritonError.INVALID_ARG))

    def finalize(self):
        if self.ledger is not None:
            self.ledger.close()


def _whole(request) -> bool:
    try:
        return bool(json.loads(request.parameters() or "{}").get(WHOLE))
    except (ValueError, AttributeError):
        return False
