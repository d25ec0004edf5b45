"""The bundled Python-backend stub under numpy 2: it gets a private numpy 1.x, and a model refuses to load
(the server never becomes ready) where the stub would misread tensors.

`make venv` installs numpy 2 (as the GPU machines' image has), so the served tests run through the private numpy;
the tests here also force each branch (numpy 2 seen, no wheel to be had, the stub's guard) on any environment.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.test_server import text_repo
from tests.sp_tokenizer import make_sp_tokenizer
from enginesmith.triton_repo import discovery
from enginesmith.triton_repo.discovery import PY, ServerNotFound, bundled_server
from enginesmith.triton_repo.server import ServerError, TritonServer

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "T" data_type: TYPE_STRING dims: [ -1 ] }, { name: "I" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "TO" data_type: TYPE_STRING dims: [ -1 ] }, { name: "IO" data_type: TYPE_INT32 dims: [ -1 ] },
         { name: "NP" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = textwrap.dedent('''
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for r in requests:
                t = pb_utils.get_input_tensor_by_name(r, "T").as_numpy()
                i = pb_utils.get_input_tensor_by_name(r, "I").as_numpy()
                where = np.array([f"{np.__version__} {np.long is np.int_} {np.__file__}".encode()], dtype=np.object_)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("TO", t), pb_utils.Tensor("IO", i * 2),
                                                       pb_utils.Tensor("NP", where)]))
            return out
''')


def echo_repo(root: Path) -> Path:
    (root / "repo" / "echo" / "1").mkdir(parents=True)
    (root / "repo" / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (root / "repo" / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return root / "repo"


def test_request_tensors_round_trip_through_the_stub(tmp_path):
    """A BYTES and an INT32 tensor come back intact (under numpy 2 the bare stub dies on the first request)."""
    import tritonclient.http as http

    with TritonServer(echo_repo(tmp_path), log_path=tmp_path / "server.log") as server:
        client = http.InferenceServerClient(server.http_url.removeprefix("http://"))
        text = http.InferInput("T", [3], "BYTES")
        text.set_data_from_numpy(np.array(["abc".encode(), b"", "\u00e9t\u00e9".encode()], dtype=np.object_))
        ints = http.InferInput("I", [3], "INT32")
        ints.set_data_from_numpy(np.array([7, -8, 1 << 29], dtype=np.int32))
        res = client.infer("echo", [text, ints])
    assert res.as_numpy("TO").tolist() == [b"abc", b"", "\u00e9t\u00e9".encode()]
    assert res.as_numpy("IO").tolist() == [14, -16, 1 << 30]
    version, has_long, path = res.as_numpy("NP")[0].decode().split(" ", 2)
    assert has_long == "True"  # numpy-2-era code (transformers' generation utilities) finds np.long
    assert int(version.split(".")[0]) < 2, f"the stub imported numpy {version} from {path}"
    if int(np.__version__.split(".")[0]) >= 2:  # this environment has numpy 2: the stub's is the private one
        assert "stub-numpy-py" in path


def test_numpy2_environment_gets_a_private_numpy1_first_on_the_stub_path(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "numpy_major", lambda: 2)
    b = bundled_server(tmp_path)
    first = Path(b.env["PATH"].split(":")[0])
    pth = first.parent / "lib" / f"python{PY}" / "site-packages" / "_enginesmith_site.pth"
    line = pth.read_text().splitlines()[0]
    m = re.fullmatch(r"import sys; sys\.path\.insert\(0, '([^']+)'\); import (\w+)", line)
    assert m, line
    private = Path(m.group(1))
    assert (private / f"{m.group(2)}.py").is_file()  # numpy 2's new names as aliases, e.g. np.long
    assert private.name == f"stub-numpy-py{PY}" and (private / ".complete").is_file()
    version = (private / "numpy" / "version.py").read_text()
    assert "version = '1." in version or 'version = "1.' in version
    assert b.env[discovery.NUMPY_GUARD_ENV] == "2"
    again = bundled_server(tmp_path)  # installed once, then reused
    assert again.env == b.env


def test_no_private_numpy_to_be_had_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(discovery, "numpy_major", lambda: 2)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv(discovery.WHEELS_ENV, str(empty))
    with pytest.raises(ServerNotFound, match=rf"misreads tensors under numpy 2.*{discovery.WHEELS_ENV}={empty}.*fix:"):
        bundled_server(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/stub-numpy-*"))  # nothing half-installed under the final name


def test_a_stub_with_the_wrong_numpy_keeps_the_server_from_becoming_ready(tmp_path):
    """The models' guard: a stub whose numpy is at or above the bound refuses to load, so tritonserver exits
    instead of reporting ready while every request fails. (Bound 1 makes any numpy 'too new'.)"""
    tok = tmp_path / "tok"
    tok.mkdir()
    make_sp_tokenizer(tok)
    server = TritonServer(text_repo(tmp_path, tok), log_path=tmp_path / "server.log", ready_timeout_s=120,
                          env={discovery.NUMPY_GUARD_ENV: "1"})
    with pytest.raises(ServerError, match=r"(?s)before it was ready.*reads tensors wrongly under numpy >= 1"):
        server.start()
    assert server.proc is None
