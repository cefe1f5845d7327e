"""``gpt``: a small causal transformer for the language-model demo and tests.

Pre-norm blocks of causal self-attention (``scaled_dot_product_attention`` with ``is_causal``)
and a GELU MLP, learned position embeddings, and the output projection tied to the token
embedding. ``forward``: ids ``(B, L)`` -> logits ``(B, L, V)``; ``hidden``: ids -> the final
hidden states ``(B, L, width)``, which with :attr:`GPT.output_weight` ``(V, width)`` give the
logits (what a chunked loss takes, so the ``(B, L, V)`` logits need never be held whole).
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

    def forward(self, x: Tensor) -> Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(b, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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

    def hidden(self, ids: Tensor) -> Tensor:
        """The final hidden states ``(B, L, width)`` of ids ``(B, L)``."""
        length = ids.shape[1]
        if length > self.context:
            raise SoftTargetsError(f"gpt: {length} tokens exceed its context of {self.context}")
        x = self.embed(ids.long()) + self.position(torch.arange(length, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, ids: Tensor) -> Tensor:
        return self.hidden(ids) @ self.output_weight.T


def gpt(
    vocab_size: int, layers: int = 2, heads: int = 4, width: int = 128, context: int = 256
) -> GPT:
    """A :class:`GPT` of ``layers`` blocks of ``heads`` heads, ``width`` wide, ``context`` long."""
    return GPT(vocab_size, layers, heads, width, context)
