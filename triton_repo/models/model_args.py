"""What our Python-backend models read at `initialize`: typed `parameters` and the HF tokenizer.

Values are upstream's `string_value`s; "" means unset (the repository writer leaves unset keys empty).
A malformed value is an error naming the key, never a silent default.
"""

from __future__ import annotations

import json
import os

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class ModelArgsError(ValueError):
    """A model parameter or tokenizer the model cannot use."""


def check_stub_numpy() -> None:
    """Refuse to load where this stub cannot read tensors: the bundled Python backend stub needs numpy below the
    major version `ENGINESMITH_STUB_NUMPY_BELOW` names (set by triton_repo/discovery.py, which also provides one)."""
    below = os.environ.get("ENGINESMITH_STUB_NUMPY_BELOW", "")
    if not below:
        return
    import numpy

    if int(numpy.__version__.split(".")[0]) >= int(below):
        raise ModelArgsError(f"numpy {numpy.__version__} ({numpy.__file__}) is first on this stub's path, but the "
                             f"bundled Triton Python backend stub reads tensors wrongly under numpy >= {below}; "
                             "start the server through `enginesmith serve` (it gives the stubs a private numpy 1.x)")


def read_parameters(args: dict) -> dict[str, str]:
    """`parameters` of the model's config as {key: string_value}."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def param_bool(params: dict[str, str], key: str, default: bool) -> bool:
    raw = params.get(key, "").strip().lower()
    if raw == "":
        return default
    if raw in TRUE or raw in FALSE:
        return raw in TRUE
    raise ModelArgsError(f"parameter {key}={params[key]!r} is not a boolean: use true or false")


def param_str(params: dict[str, str], key: str, default: str = "") -> str:
    value = params.get(key, "").strip()
    if value.startswith("${"):
        raise ModelArgsError(f"parameter {key}={value!r} is an unfilled template placeholder; "
                             "regenerate the repository with `enginesmith repo RECIPE`")
    return value or default


def load_tokenizer(tokenizer_dir: str):
    """The HF tokenizer as upstream loads it (left padding; pad falls back to eos)."""
    if not tokenizer_dir:
        raise ModelArgsError("parameter tokenizer_dir is empty: give the Hugging Face tokenizer folder")
    try:
        from transformers import AutoTokenizer
    except (ImportError, AttributeError) as e:  # transformers' model utilities failed to import in this stub
        from transformers import PreTrainedTokenizerFast as AutoTokenizer  # tokenizer.json folders load without them

        print(f"enginesmith: AutoTokenizer unavailable ({str(e).splitlines()[0]}); loading "
              f"{tokenizer_dir} as a fast tokenizer", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, legacy=False, padding_side="left")
    except (OSError, ValueError) as e:
        raise ModelArgsError(f"cannot load the tokenizer from tokenizer_dir={tokenizer_dir}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def special_id(tok, token: str | None) -> int:
    """Id of a special token (-1 when the tokenizer has none: no end/pad id)."""
    if token is None:
        return -1
    tid = tok.convert_tokens_to_ids(token)
    return -1 if tid is None else int(tid)
