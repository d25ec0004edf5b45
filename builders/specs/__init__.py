"""Model specs shipped with enginesmith, so planning the reference deployments needs no network.

Each `<name>.json` holds `name`, `repo_ids` (Hugging Face ids it stands for), `published` (the model
card's parameter counts, checked by the tests), `config` (the fields of the model's config.json) and, where
the checkpoint needs `trust_remote_code`, `remote_code` (what custom code it runs; the plan warns of it).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enginesmith.builders.model_spec import ModelSpec, ModelSpecError

if TYPE_CHECKING:
    from enginesmith.builders.model_source import SourceRef
    from enginesmith.builders.recipe import ModelSection

SPEC_DIR = Path(__file__).parent


def shipped_names() -> list[str]:
    """Names of all shipped specs, sorted."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def shipped_entry(name: str) -> dict[str, Any]:
    """The raw JSON entry of a shipped spec."""
    path = SPEC_DIR / f"{name}.json"
    if not path.is_file():
        raise ModelSpecError(f"no shipped spec {name!r}; shipped: {', '.join(shipped_names())}")
    return json.loads(path.read_text())


def load_shipped(name: str) -> ModelSpec:
    """A shipped spec as a ModelSpec (planning-only architectures included)."""
    return ModelSpec.from_hf_config(shipped_entry(name)["config"], name=name, planning=True)


def name_for_repo(repo_id: str) -> str | None:
    """The shipped spec standing for a Hugging Face repo id (case-insensitive), if any."""
    wanted = repo_id.lower()
    for name in shipped_names():
        if wanted in (r.lower() for r in shipped_entry(name)["repo_ids"]):
            return name
    return None


def resolve_spec(model: ModelSection) -> ModelSpec:
    """Spec for a recipe's model: shipped by name or repo id, else local config.json, else the Hub."""
    if model.spec:
        return load_shipped(model.spec)
    from enginesmith.builders.model_source import classify_source

    ref = classify_source(model.source)
    if ref.local:
        if not ref.path.is_dir():
            raise ModelSpecError(ref.missing() if not ref.path.exists() else
                                 f"model.source={model.source!r}: {ref.path} is not a folder")
        return ModelSpec.from_pretrained_dir(ref.path.resolve(), planning=True)
    if name := name_for_repo(model.source):
        return load_shipped(name)
    return _from_hub(ref, model.revision)


def resolve_spec_offline(model: ModelSection) -> ModelSpec | None:
    """Like `resolve_spec` but None when only the network could answer (or the local folder is absent)."""
    if model.spec:
        return load_shipped(model.spec)
    local = model.local_path()
    if local is not None:
        return ModelSpec.from_pretrained_dir(local, planning=True) if (local / "config.json").is_file() else None
    name = name_for_repo(model.source)
    return load_shipped(name) if name else None


def _from_hub(ref: SourceRef, revision: str) -> ModelSpec:
    from huggingface_hub import hf_hub_download

    from enginesmith.builders.hub_errors import hub_error_message

    try:
        path = hf_hub_download(ref.text, "config.json", revision=revision)
    except Exception as e:  # the Hub's errors, or its HTTP library's when the network fails
        raise ModelSpecError(hub_error_message(ref, revision, e, "fetch config.json of",
                                               f"set model.spec to one of {', '.join(shipped_names())}")) from None
    return ModelSpec.from_hf_config(json.loads(Path(path).read_text()), name=ref.text, planning=True)
