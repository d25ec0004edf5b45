"""The model's Hugging Face tokenizer on the client side (token-id requests, exact token counts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enginesmith.client.params import ClientError, GenerateParams


def load_tokenizer(path: str | Path) -> Any:
    """AutoTokenizer from a local folder (transformers imported lazily)."""
    p = Path(path)
    if not p.is_dir():
        raise ClientError(f"tokenizer folder {p} does not exist: pass --tokenizer <dir with tokenizer.json>")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def with_token_ids(p: GenerateParams, tokenizer: Any) -> GenerateParams:
    """Fill input_ids, stop/bad word ids and end/pad ids the way the preprocessing model would."""
    if tokenizer is None:
        if not p.input_ids:
            raise ClientError("the tensorrt_llm model takes token ids: pass --tokenizer (or input_ids)")
        if p.stop_words or p.bad_words:
            raise ClientError("stop/bad words for the tensorrt_llm model need --tokenizer to encode them")
        return p
    ids = p.input_ids or tokenizer.encode(p.text)
    enc = lambda words: [tokenizer.encode(w, add_special_tokens=False) for w in words]  # noqa: E731
    end_id = p.end_id if p.end_id is not None else tokenizer.eos_token_id
    pad_id = p.pad_id if p.pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                    else end_id)
    return GenerateParams(**{**p.__dict__, "input_ids": list(ids), "end_id": end_id, "pad_id": pad_id,
                             "stop_words_ids": p.stop_words_ids or (enc(p.stop_words) or None),
                             "bad_words_ids": p.bad_words_ids or (enc(p.bad_words) or None),
                             "stop_words": [], "bad_words": []})


def decoder(tokenizer: Any):
    if tokenizer is None:
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
