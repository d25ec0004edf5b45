"""Find a tritonserver and the environment its Python-backend stubs need.

A `tritonserver` on PATH wins (a Triton container). Otherwise the one bundled in the `nvidia-pytriton`
wheel is used, with a backend directory holding the Python backend library, its utils and the stub built
for the running interpreter, and the wheel's libraries on LD_LIBRARY_PATH.

The stub embeds the shared libpython it was linked with and ignores PYTHONPATH; it finds its prefix from
the first `python3` on PATH. Its standard library must come from that same libpython's installation (a
pyenv build's stdlib extensions fail against a distribution libpython), while our packages live in this
virtualenv. So when the two installations differ we write a small venv-like "stub environment" whose
`home` is the libpython's installation and whose site-packages add this environment's site-packages
(a `.pth` file), and put its bin first on PATH. PYTHONPATH is set too, for stubs that honour it.

The bundled stub (Python backend 2.51) was built against numpy 1's C ABI: under numpy >= 2 it misreads every
tensor a request carries (a BYTES tensor's length prefixes come out as garbage and the stub dies). So when this
environment's numpy is 2 or newer, the stubs get a private numpy < 2 first on their path, and only they: it is
installed once by pip into the cache folder, from `ENGINESMITH_STUB_WHEELS` (a folder of wheels, for machines
without a package index) or else the configured index. Where that cannot be had, `bundled_server` refuses with
the cause and the fix instead of starting a server whose every request fails.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import enginesmith

IMPORT_ROOT = Path(enginesmith.__file__).resolve().parents[1]
"""The folder the stubs import `enginesmith` from: the checkout root, or where it is installed."""
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
STUB_NUMPY = "numpy>=1.21,<2"
WHEELS_ENV = "ENGINESMITH_STUB_WHEELS"
NUMPY_GUARD_ENV = "ENGINESMITH_STUB_NUMPY_BELOW"
"""Set for the bundled stubs: the numpy major version they must stay below (models check it at initialize)."""


class ServerNotFound(RuntimeError):
    """No usable tritonserver (or its Python backend cannot run here); the message says what to install."""


@dataclass(frozen=True, slots=True)
class ServerBinary:
    path: Path
    backend_dir: Path | None
    """None: the server's own default (/opt/tritonserver/backends)."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables set for the server (and exported to every MPI rank)."""
    bundled: bool = False
    stub_numpy: Path | None = None
    """The private numpy < 2 first on the bundled stubs' path (None: the environment's numpy is used)."""


def _atomic_text(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() and dst.resolve() == src.resolve():
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(src)
    tmp.replace(dst)


def linked_libpython(stub: Path, ld_library_path: str) -> Path:
    """The libpython the stub loads (ldd), resolved; ServerNotFound when it is missing."""
    try:
        out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "LD_LIBRARY_PATH": ld_library_path}).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ServerNotFound(f"cannot inspect {stub} with ldd: {e}") from None
    m = re.search(r"(libpython\S+)\s*=>\s*(\S+)", out)
    if m is None:
        raise ServerNotFound(f"{stub} does not link a libpython (ldd output:\n{out})")
    if m.group(2) == "not":
        raise ServerNotFound(f"the Python backend stub needs {m.group(1)}, which is not installed here: install "
                             f"your distribution's libpython{PY} package (e.g. apt-get install libpython{PY})")
    return Path(m.group(2)).resolve()


def installation_prefix(libpython: Path) -> Path:
    """The prefix whose lib/pythonX.Y/os.py belongs to this libpython (e.g. /usr for Debian's)."""
    for parent in libpython.parents:
        if (parent / "lib" / f"python{PY}" / "os.py").is_file():
            return parent
    raise ServerNotFound(f"no Python {PY} standard library found next to {libpython} (looked for "
                         f"lib/python{PY}/os.py above it); install the full python{PY} package")


NUMPY_COMPAT = "_enginesmith_numpy2_names"
NUMPY_COMPAT_SOURCE = '''"""numpy 2's new top-level names, as aliases on the stubs' private numpy 1.x.

Code written for numpy 2 (transformers' generation utilities use np.long) runs in the stubs unchanged; only names
numpy 1.x lacks are added, each bound to what numpy 2 defines it as. Written by enginesmith (triton_repo/discovery.py).
"""
import numpy as _np

for _name, _value in {
    "long": _np.int_, "ulong": _np.uint, "bool": _np.bool_, "concat": _np.concatenate, "pow": _np.power,
    "permute_dims": _np.transpose, "acos": _np.arccos, "asin": _np.arcsin, "atan": _np.arctan,
    "atan2": _np.arctan2, "acosh": _np.arccosh, "asinh": _np.arcsinh, "atanh": _np.arctanh,
    "bitwise_left_shift": _np.left_shift, "bitwise_right_shift": _np.right_shift, "bitwise_invert": _np.invert,
}.items():
    if _name not in _np.__dict__:
        setattr(_np, _name, _value)
'''


def numpy_major() -> int | None:
    """The major version of the numpy this environment (and so the stubs) would import; None without numpy."""
    try:
        return int(importlib.metadata.version("numpy").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def stub_numpy(root: Path) -> Path:
    """A folder holding numpy < 2 for this Python, installed once under `root` (see the module docstring)."""
    dest = root / f"stub-numpy-py{PY}"
    if (dest / ".complete").is_file():
        return dest
    tmp = root / f".stub-numpy-py{PY}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-compile", "--only-binary=:all:", "--target", str(tmp)]
    wheels = os.environ.get(WHEELS_ENV, "")
    if wheels:
        cmd += ["--no-index", "--find-links", wheels]
    try:
        done = subprocess.run([*cmd, STUB_NUMPY], capture_output=True, text=True, timeout=600)
        failure = done.stderr.strip().splitlines()[-1:] if done.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        failure = [str(e)]
    if failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f"from {WHEELS_ENV}={wheels}" if wheels else "from the package index"
        raise ServerNotFound(
            f"the bundled Triton Python backend misreads tensors under numpy {numpy_major()}.x, and a private "
            f"{STUB_NUMPY} for its stubs could not be installed {where} ({' '.join(failure) or 'pip failed'}); "
            f"fix: let pip reach the index once, or set {WHEELS_ENV} to a folder holding a numpy 1.26 wheel for "
            f"Python {PY} (pip download 'numpy<2' --only-binary=:all: -d DIR)")
    (tmp / f"{NUMPY_COMPAT}.py").write_text(NUMPY_COMPAT_SOURCE)
    (tmp / ".complete").write_text(STUB_NUMPY + "\n")
    try:
        tmp.replace(dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def stub_environment(prefix: Path, root: Path, first: Path | None = None) -> Path:
    """A venv-like directory: stdlib from `prefix`, plus this interpreter's site-packages and PYTHONPATH
    (`first`, when given, ahead of everything). Returns its bin."""
    env = root / f"stub-env-py{PY}"
    bin_dir, sp = env / "bin", env / "lib" / f"python{PY}" / "site-packages"
    bin_dir.mkdir(parents=True, exist_ok=True)
    sp.mkdir(parents=True, exist_ok=True)
    _atomic_text(env / "pyvenv.cfg", f"home = {prefix / 'bin'}\ninclude-system-site-packages = false\n")
    target = prefix / "bin" / f"python{PY}"
    _link(target if target.exists() else Path(sys.executable), bin_dir / "python3")
    lines = [f"import sys; sys.path.insert(0, {str(first)!r}); import {NUMPY_COMPAT}"] if first is not None else []
    lines += [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    lines += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    _atomic_text(sp / "_enginesmith_site.pth", "\n".join([*lines, str(IMPORT_ROOT)]) + "\n")
    return bin_dir


def python_path_env(python_bin: Path) -> dict[str, str]:
    path = os.pathsep.join([str(python_bin), os.environ.get("PATH", "")])
    pythonpath = [str(IMPORT_ROOT), *site.getsitepackages(), os.environ.get("PYTHONPATH", "")]
    return {"PATH": path, "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p)}


def bundled_server(cache_dir: str | Path | None = None) -> ServerBinary:
    """The tritonserver of the nvidia-pytriton wheel, set up for this interpreter."""
    import importlib.util

    # Located, not imported: only the wheel's server files are used, and its Python API needs gevent
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerNotFound("no tritonserver on PATH and nvidia-pytriton is not installed: install the serve "
                             "extra (pip install -e '.[serve]') or put a tritonserver on PATH")
    site_dir = Path(list(spec.submodule_search_locations)[0]).resolve().parent
    dist = site_dir / "pytriton" / "tritonserver"
    stub = dist / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
        raise ServerNotFound(f"nvidia-pytriton has no Python backend stub for Python {PY} (it has "
                             f"{', '.join(have)}); run enginesmith with one of those Python versions")
    digest = hashlib.sha256(str(dist).encode()).hexdigest()[:12]
    root = Path(cache_dir or Path(tempfile.gettempdir()) / f"enginesmith-triton-{os.getuid()}") / digest
    backends = root / "backends" / "python"
    backends.mkdir(parents=True, exist_ok=True)
    for src in (dist / "backends" / "python" / "libtriton_python.so",
                dist / "backends" / "python" / "triton_python_backend_utils.py", stub):
        _link(src, backends / src.name)
    libs = os.pathsep.join(p for p in (str(site_dir / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH"))
                           if p)
    prefix = installation_prefix(linked_libpython(stub, libs))
    same = prefix.resolve() == Path(sys.base_prefix).resolve()
    numpy = stub_numpy(root) if (numpy_major() or 0) >= 2 else None
    python_bin = Path(sys.executable).parent if same and numpy is None else stub_environment(prefix, root, numpy)
    return ServerBinary(dist / "bin" / "tritonserver", backends.parent,
                        {**python_path_env(python_bin), "LD_LIBRARY_PATH": libs, NUMPY_GUARD_ENV: "2"}, bundled=True,
                        stub_numpy=numpy)


def find_server(cache_dir: str | Path | None = None) -> ServerBinary:
    """`tritonserver` on PATH, else the bundled one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), None, python_path_env(Path(sys.executable).parent))
    return bundled_server(cache_dir)
