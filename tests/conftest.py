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


@pytest.fixture
def same_token_store():
    """``check(path_a, path_b)``: the two token store files hold the same store, tensor for
    tensor (the processes and streamed-labelling tests compare stores made two ways)."""
    from softtargets.store.tokens import TokenStore

    def check(path_a, path_b) -> None:
        a, b = TokenStore.load(path_a), TokenStore.load(path_b)
        assert (a.top, a.temperatures, a.blocks_fingerprint, a.teacher_fingerprint) == (
            b.top, b.temperatures, b.blocks_fingerprint, b.teacher_fingerprint
        )  # fmt: skip
        for part in ("block_ids", "steps", "packed_ids", "packed_codes", "largest", "rest"):
            assert torch.equal(getattr(a, part), getattr(b, part)), part
        assert (a.spans is None) == (b.spans is None)
        assert a.spans is None or torch.equal(a.spans, b.spans)

    return check
