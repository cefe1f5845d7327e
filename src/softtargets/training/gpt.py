"""``gpt``: a small causal transformer for the language-model demo and tests.

Pre-norm blocks of causal self-attention (``scaled_dot_product_attention`` with ``is_causal``)
and a GELU MLP, learned position embeddings, and the output projection tied to the token
embedding. ``forward``: ids ``(B, L)`` -> logits ``(B, L, V)``; ``hidden``: ids -> the final
hidden states ``(B, L, width)``, which with :attr:`GPT.output_weight` ``(V, width)`` give the
logits (what a chunked loss takes, so the ``(B, L, V)`` logits need never be held whole);
``extend``: the logits of new ids after those a key-value cache holds, and the cache grown by
them (sampling a token at a time then costs one position's work per token, not the whole
prefix's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtargets.errors import SoftTargetsError


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        """``x (B, n, width)`` -> ``(B, n, width)``; with ``cache`` (``[]`` or this block's
        ``[keys, values]``, each ``(B, heads, t, width / heads)``) the ``n`` positions follow the
        ``t`` cached ones, and the cache is extended by them in place."""
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(b, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].shape[2]
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        if past == 0:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new position i sees every cached one and the new ones up to itself
            seen = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(past)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        x = x + self.out(attended.transpose(1, 2).reshape(b, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A causal language model: ids ``(B, L)`` -> logits ``(B, L, vocab_size)``."""

    def __init__(
        self, vocab_size: int, layers: int = 2, heads: int = 4, width: int = 128, context: int = 256
    ) -> None:
        super().__init__()
        if width % heads:
            raise SoftTargetsError(f"gpt: width {width} must be a multiple of heads {heads}")
        self.context = context
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    @property
    def output_weight(self) -> Tensor:
        """``(V, width)``: the output projection, tied to the token embedding."""
        return self.embed.weight

    def hidden(self, ids: Tensor, cache: list[list[Tensor]] | None = None) -> Tensor:
        """The final hidden states ``(B, L, width)`` of ids ``(B, L)`` (after the positions
        ``cache`` holds, extending it, when one is given: see :meth:`extend`)."""
        past = cache[0][0].shape[2] if cache and cache[0] else 0
        end = past + ids.shape[1]
        if end > self.context:
            raise SoftTargetsError(f"gpt: {end} tokens exceed its context of {self.context}")
        positions = torch.arange(past, end, device=ids.device)
        x = self.embed(ids.long()) + self.position(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.norm(x)

    def forward(self, ids: Tensor) -> Tensor:
        return self.hidden(ids) @ self.output_weight.T

    def extend(
        self, ids: Tensor, cache: list[list[Tensor]] | None = None
    ) -> tuple[Tensor, list[list[Tensor]]]:
        """``(logits (B, n, V), cache)``: the logits of ids ``(B, n)`` that follow the positions
        in ``cache`` (``None``: none yet), and the cache holding them all. Equal to the matching
        positions of ``forward`` on the whole sequence."""
        cache = cache if cache is not None else [[] for _ in self.blocks]
        return self.hidden(ids, cache) @ self.output_weight.T, cache


def gpt(
    vocab_size: int, layers: int = 2, heads: int = 4, width: int = 128, context: int = 256
) -> GPT:
    """A :class:`GPT` of ``layers`` blocks of ``heads`` heads, ``width`` wide, ``context`` long."""
    return GPT(vocab_size, layers, heads, width, context)
