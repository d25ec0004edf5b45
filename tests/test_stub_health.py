"""A served model whose Python-backend stub dies: `TritonServer.watch` (what `enginesmith serve` blocks in) names
it, instead of a server that keeps reporting ready while every request to that model fails."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.sp_tokenizer import make_sp_tokenizer
from tests.test_server import text_repo
from enginesmith.triton_repo.server import TritonServer

pytestmark = [pytest.mark.server, pytest.mark.timeout(300)]


def test_a_dead_stub_ends_the_watch_with_its_model_named(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    make_sp_tokenizer(tok)
    with TritonServer(text_repo(tmp_path, tok), log_path=tmp_path / "server.log") as server:
        stubs = server.stubs()
        assert sorted(stubs.values()) == ["postprocessing", "preprocessing"]
        result: list[str | None] = []
        watcher = threading.Thread(target=lambda: result.append(server.watch(poll_s=0.2)), daemon=True)
        watcher.start()
        time.sleep(1.0)
        assert watcher.is_alive() and server.is_ready()  # a healthy server: the watch goes on
        victim = next(pid for pid, model in stubs.items() if model == "postprocessing")
        os.kill(victim, signal.SIGKILL)
        watcher.join(timeout=20)
        assert not watcher.is_alive(), "the watch did not notice the dead stub"
        assert result[0] is not None and f"model 'postprocessing' (pid {victim}) died" in result[0]
