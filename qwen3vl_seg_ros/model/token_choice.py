"""How the next token is picked from the language model's logits.

Plain greedy decoding takes the single most likely token. For a box coordinate that is the wrong
question when each value 0..1000 is one token (the tiny task tokenizer): a model that is sure the
left edge lies near 300 but not whether it is 296 or 304 spreads that belief over a dozen tokens,
each of which can end up less likely than one stray word. Measured on a label-first model trained
from scratch (docs/training.md, "Round 17"): after ``"bbox_2d": [0,`` the numbers held 0.88 of
the probability, but no single number more than 0.014, and greedy decoding wrote " purple".

:func:`pick_tokens` asks two questions instead. Is the next token a number at all (do the numbers
together outweigh the likeliest other token)? If so, which value has the most probability around
it, within ``window`` units either side (nearer values weigh more, so that a lone peak wins over
its neighbours)? With ``window`` 0 this is the likeliest number; a model that puts all its mass on
one token gets the greedy token back. Where numbers are not single tokens (the
real Qwen tokenizer writes digits one by one) there is nothing to group, and the choice is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Largest coordinate of Qwen3-VL's relative boxes; the numbers 0..this are grouped.
COORD_MAX = 1000


@dataclass(frozen=True)
class NumberTokens:
    """The token ids of the values 0..``COORD_MAX`` (index = value) and the half-width of the window."""

    ids: torch.Tensor  # (COORD_MAX + 1,) int64
    window: int


def number_token_ids(tokenizer: object, limit: int = COORD_MAX) -> list[int] | None:
    """Ids of the tokens "0" .. ``limit`` when each is a single distinct token (the task tokenizer),
    else None. Training's coordinate losses use them too."""
    ids = [tokenizer.convert_tokens_to_ids(str(v)) for v in range(limit + 1)]  # type: ignore[attr-defined]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unknown for i in ids) or len(set(ids)) != len(ids):
        return None
    return ids


def number_tokens(tokenizer: object, window: int, device: torch.device | str = "cpu") -> NumberTokens | None:
    """The grouping for ``tokenizer``, or None where "0".."1000" are not one distinct token each."""
    if window < 0:
        raise ValueError(f"the coordinate window must be >= 0 units, got {window}")
    ids = number_token_ids(tokenizer)
    return None if ids is None else NumberTokens(torch.tensor(ids, dtype=torch.long, device=device), int(window))


def window_mass(number_probs: torch.Tensor, window: int, triangular: bool = False) -> torch.Tensor:
    """``(B, N)``: for each value, the probability of the values within ``window`` of it.

    ``triangular`` weighs each neighbour by ``1 - d / (window + 1)`` at distance ``d`` instead: the
    score the choice maximises, since with flat weights every value within ``window`` of a lone
    peak ties with the peak itself.
    """
    if window == 0:
        return number_probs
    offsets = torch.arange(-window, window + 1, device=number_probs.device, dtype=number_probs.dtype)
    kernel = 1.0 - offsets.abs() / (window + 1) if triangular else torch.ones_like(offsets)
    return F.conv1d(number_probs[:, None], kernel.view(1, 1, -1), padding=window)[:, 0]


def pick_tokens(logits: torch.Tensor, numbers: NumberTokens | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, prob)``, each ``(B,)``, for logits ``(B, V)``.

    ``prob`` is what the choice is worth: the token's probability, or for a number the
    probability of its window (the model's belief that the value lies within ``window`` units).
    Pure tensor operations (no host reads), so a CUDA graph can capture it.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if numbers is None:
        token = torch.argmax(logits, dim=-1)  # on the logits, exactly as generate(do_sample=False)
        return token, probs.gather(-1, token[:, None])[:, 0]
    on_numbers = probs.index_select(-1, numbers.ids)
    other_prob, other = probs.index_fill(-1, numbers.ids, 0.0).max(dim=-1)
    value = window_mass(on_numbers, numbers.window, triangular=True).argmax(dim=-1)
    number_prob = window_mass(on_numbers, numbers.window).gather(-1, value[:, None])[:, 0]
    is_number = on_numbers.sum(-1) > other_prob
    return torch.where(is_number, numbers.ids[value], other), torch.where(is_number, number_prob, other_prob)

