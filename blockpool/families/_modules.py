"""Embedding and head modules shared by the families.

Layers are transformers' own classes; embeddings and heads are spread over a model's
top-level modules in transformers, so a block gathers the pieces it needs here. Every
embedding module takes ``(input_ids, attention_mask, position_ids, past_length)`` and
returns hidden states ``[B, T, d]``; every head maps hidden states to its output.
"""

from __future__ import annotations

import torch
from torch import nn

from blockpool.errors import UsageError

__all__ = ["AbsoluteEmbed", "EncoderEmbed", "LMHead", "LearnedOffsetEmbed", "Pooler", "TokenEmbed"]


def check_positions(length: int, limit: int) -> None:
    """Refuse a sequence longer than a learned position table (it would index past it)."""
    if length > limit:
        raise UsageError(
            f"an input of {length} tokens is longer than the {limit} positions this model "
            f"has learned; give inputs of at most {limit} tokens (context included)"
        )


class TokenEmbed(nn.Module):
    """Token embeddings only (rotary families): ``tokens(input_ids)``."""

    def __init__(self, tokens: nn.Module) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_length=0):
        return self.tokens(input_ids)


class AbsoluteEmbed(nn.Module):
    """Token plus learned absolute position embeddings (GPT-2): ``wte(ids) + wpe(pos)``."""

    def __init__(self, tokens: nn.Embedding, positions: nn.Embedding) -> None:
        super().__init__()
        self.tokens = tokens
        self.positions = positions

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_length=0):
        check_positions(past_length + input_ids.shape[1], self.positions.num_embeddings)
        return self.tokens(input_ids) + self.positions(position_ids)


class LearnedOffsetEmbed(nn.Module):
    """OPT: tokens (optionally projected up) plus padding-aware learned positions.

    OPT derives positions from the cumulative attention mask, so left padding shifts
    them; the ``positions`` module is transformers' ``OPTLearnedPositionalEmbedding``.
    """

    def __init__(self, tokens: nn.Embedding, positions: nn.Module, project_in: nn.Module | None):
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.project_in = project_in

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_length=0):
        batch, length = input_ids.shape
        offset = getattr(self.positions, "offset", 2)
        check_positions(past_length + length, self.positions.num_embeddings - offset)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long)
        hidden = self.tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        return hidden + self.positions(attention_mask.to(input_ids.device), past_length)


class EncoderEmbed(nn.Module):
    """BERT-style embeddings (word + position + token type, then LayerNorm).

    The wrapped transformers module derives positions itself (RoBERTa offsets them by
    the padding index), so the runner's position ids are not passed on.
    """

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_length=0):
        table = self.embeddings.position_embeddings.num_embeddings
        first = getattr(self.embeddings, "padding_idx", None)  # RoBERTa: positions after it
        check_positions(past_length + input_ids.shape[1], table - (first + 1 if first else 0))
        return self.embeddings(input_ids=input_ids)


class LMHead(nn.Module):
    """Final norm, optional down-projection (OPT), LM head, optional logit soft-capping."""

    def __init__(
        self,
        norm: nn.Module | None,
        lm_head: nn.Linear,
        project_out: nn.Module | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.project_out = project_out
        self.lm_head = lm_head
        self.softcap = softcap

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head multiplies: normed (and projected) hidden states."""
        if self.norm is not None:
            hidden = self.norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma-style logit soft-capping, where the config asks for it."""
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(self.lm_head(self.features(hidden)))


class Pooler(nn.Module):
    """Encoder head: transformers' pooler on the first token (``[B, d]``)."""

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.pooler(hidden)
