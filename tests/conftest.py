"""Fixtures of the tests that talk to the served tiny model (built and started once: tests/client_served.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def served():
    from tests.client_served import served_tiny

    return served_tiny()


@pytest.fixture(scope="module")
def tok(served):
    """The served model's tokenizer (test modules with a tokenizer of their own define `tok` themselves)."""
    from enginesmith.client.tokenizer import load_tokenizer

    return load_tokenizer(served.tokenizer_dir)
