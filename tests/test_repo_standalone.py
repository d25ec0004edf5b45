"""The repository is self-contained: pre/postprocessing and the BLS run on a plain tritonserver without enginesmith.

The helpers they import are copied beside each model.py (and recorded in the manifest); the server's Python
stub gets numpy and transformers but cannot import `enginesmith` (tests/container_rehearsal.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from enginesmith.builders.tiny_model import make_tokenizer
from tests.container_rehearsal import SELF_CONTAINED, plain_tritonserver, run, text_round_trip
from tests.test_repository import recipe, reference_engine, write
from enginesmith.triton_repo.repository import MODELS_DIR, helper_files

PACKAGE = Path(__file__).resolve().parents[1] / "triton_repo"


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    tok = root / "tok"
    make_tokenizer(tok)
    manifest = write(recipe(), reference_engine(root / "engine"), tok, root / "repo")
    return root, tok, manifest


def test_helpers_are_copied_and_recorded(standalone):
    root, _, manifest = standalone
    repo = root / "repo"
    for model in SELF_CONTAINED:
        helpers = helper_files(MODELS_DIR / f"{model}.py")
        assert {"enginesmith/__init__.py", "enginesmith/triton_repo/__init__.py",
                "enginesmith/triton_repo/text_tensors.py"} <= helpers.keys()
        for rel, src in helpers.items():
            copy = repo / model / "1" / rel
            want = src.encode() if isinstance(src, str) else src.read_bytes()
            assert copy.read_bytes() == want and f"{model}/1/{rel}" in manifest.outputs
        assert not any(rel.startswith("triton_repo") for rel in helpers)
    assert "enginesmith/triton_repo/detokenize.py" in helper_files(MODELS_DIR / "postprocessing.py")
    assert "enginesmith/triton_repo/model_config.py" in helper_files(MODELS_DIR / "tensorrt_llm_bls.py")
    assert not (repo / "tensorrt_llm" / "1" / "enginesmith").exists()  # the reference runtime needs enginesmith
    assert not manifest.mismatched_outputs(repo)
    (repo / "preprocessing/1/enginesmith/triton_repo/text_tensors.py").write_text("# altered\n")
    assert manifest.mismatched_outputs(repo) == ["preprocessing/1/enginesmith/triton_repo/text_tensors.py"]


def test_a_model_importing_another_enginesmith_package_is_refused(tmp_path):
    from enginesmith.triton_repo.repository import RepoError

    bad = tmp_path / "model.py"
    bad.write_text("from enginesmith.triton_repo.text_tensors import text_array\n"
                   "from enginesmith.runtime.engine.engine import Engine\n")
    with pytest.raises(RepoError, match="model.py needs enginesmith.runtime.engine.engine"):
        helper_files(bad)


def test_a_model_importing_a_bare_package_name_is_told_the_import_root(tmp_path):
    from enginesmith.triton_repo.repository import RepoError

    bad = tmp_path / "model.py"
    bad.write_text("from triton_repo.text_tensors import text_array\n")
    with pytest.raises(RepoError, match=r"model.py imports triton_repo.text_tensors: import it as "
                                        r"enginesmith.triton_repo.text_tensors$"):
        helper_files(bad)


def test_the_copied_import_root_is_a_plain_package(standalone, tmp_path):
    """The copy beside model.py imports its own helpers only: its `enginesmith` does not reach the checkout."""
    root, _, _ = standalone
    model_dir = root / "repo" / "postprocessing" / "1"
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import enginesmith, enginesmith.triton_repo.detokenize as d;"
             " print(list(enginesmith.__path__), d.__file__)")
    out = subprocess.run([sys.executable, "-c", probe, str(model_dir)], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [f"['{model_dir / 'enginesmith'}']", str(model_dir / "enginesmith" / "triton_repo" / "detokenize.py")]


@pytest.mark.server
@pytest.mark.timeout(300)
def test_plain_tritonserver_serves_them_without_enginesmith(tmp_path, standalone):
    from transformers import AutoTokenizer

    _, tok, _ = standalone
    # A fresh copy: the other test of this module alters one helper of the shared repository.
    repo = tmp_path / "repo"
    write(recipe(), reference_engine(tmp_path / "engine"), tok, repo)
    with plain_tritonserver(repo, SELF_CONTAINED, tmp_path) as (url, env):
        stub_python = Path(env["PATH"].split(":")[0]) / "python3"
        probe = ("import importlib.util as u; "
                 "print([m for m in ('enginesmith', 'triton_repo', 'builders', 'numpy') if u.find_spec(m)])")
        assert run([stub_python, "-c", probe], cwd=tmp_path, env=env).strip() == "['numpy']"
        ids, text = text_round_trip(url, tok, "The quick brown fox")
        t = AutoTokenizer.from_pretrained(tok)
        assert ids == t.encode("The quick brown fox") and text == "The quick brown fox"
        import urllib.request

        with urllib.request.urlopen(f"{url}/v2/models/tensorrt_llm_bls/ready", timeout=5) as r:
            assert r.status == 200
