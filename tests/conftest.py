"""Shared fixtures. Every test runs on the CPU with a private dataset cache."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Generated datasets are cached per test session, never in the user's home.
    monkeypatch.setenv("SOFTTARGETS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.set_num_threads(1)
