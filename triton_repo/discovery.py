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
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


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


def stub_environment(prefix: Path, root: Path) -> Path:
    """A venv-like directory: stdlib from `prefix`, plus this interpreter's site-packages. Returns its bin."""
    env = root / f"stub-env-py{PY}"
    bin_dir, sp = env / "bin", env / "lib" / f"python{PY}" / "site-packages"
    bin_dir.mkdir(parents=True, exist_ok=True)
    sp.mkdir(parents=True, exist_ok=True)
    _atomic_text(env / "pyvenv.cfg", f"home = {prefix / 'bin'}\ninclude-system-site-packages = false\n")
    target = prefix / "bin" / f"python{PY}"
    _link(target if target.exists() else Path(sys.executable), bin_dir / "python3")
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    _atomic_text(sp / "_enginesmith_site.pth", "\n".join([*lines, str(REPO_ROOT)]) + "\n")
    return bin_dir


def python_path_env(python_bin: Path) -> dict[str, str]:
    path = os.pathsep.join([str(python_bin), os.environ.get("PATH", "")])
    pythonpath = [str(REPO_ROOT), *site.getsitepackages(), os.environ.get("PYTHONPATH", "")]
    return {"PATH": path, "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p)}


def bundled_server(cache_dir: str | Path | None = None) -> ServerBinary:
    """The tritonserver of the nvidia-pytriton wheel, set up for this interpreter."""
    try:
        import pytriton
    except ImportError:
        raise ServerNotFound("no tritonserver on PATH and nvidia-pytriton is not installed: install the serve "
                             "extra (pip install -e '.[serve]') or put a tritonserver on PATH") from None
    site_dir = Path(pytriton.__file__).resolve().parent.parent
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
    python_bin = Path(sys.executable).parent if same else stub_environment(prefix, root)
    return ServerBinary(dist / "bin" / "tritonserver", backends.parent,
                        {**python_path_env(python_bin), "LD_LIBRARY_PATH": libs}, bundled=True)


def find_server(cache_dir: str | Path | None = None) -> ServerBinary:
    """`tritonserver` on PATH, else the bundled one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), None, python_path_env(Path(sys.executable).parent))
    return bundled_server(cache_dir)
