"""Greedy generation that also returns what the mask decoder needs from the language model.

``model.generate`` gives tokens but not, cheaply, the last-layer hidden state of each generated
token (the decoder's object query) or the probability of each token (the box confidence). The
:class:`Generator` interface returns all three. :class:`EagerGreedyGenerator` is the reference
implementation: a plain loop over a dynamic KV cache, token for token the same as
``generate(do_sample=False)`` (unless coordinates are chosen by their window of values, see
:mod:`.token_choice`). A faster implementation (static cache, CUDA graphs) can replace the
per-token :meth:`EagerGreedyGenerator.decode_step` behind the same interface; the prefill, which
runs the one vision pass of a frame, stays a separate step.

Hidden state convention: ``hidden_states[i]`` is the final-norm output at the position of
``token_ids[i]``, i.e. computed when that token is fed back in. A stop token is never fed back,
so it has none: ``len(hidden_states) == len(token_ids) - finished``.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from qwen3vl_seg_ros.model.token_choice import NumberTokens, pick_tokens


@dataclass
class GenerationOutput:
    """Generated tokens with their probabilities and hidden states."""

    token_ids: torch.Tensor  # (T,) int64, on the CPU
    token_probs: torch.Tensor  # (T,) float32 on the CPU, probability of each chosen token
    hidden_states: torch.Tensor  # (T - finished, D), model device and dtype
    finished: bool  # True when the last token is a stop token


class Generator(ABC):
    """Turns processor inputs (one image and its prompt) into a :class:`GenerationOutput`."""

    @abstractmethod
    def generate(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> GenerationOutput:
        """Greedy-decodes at most ``max_new_tokens`` tokens for a batch of one."""


@dataclass
class DecodeState:
    """What one sequence's decoding carries from step to step."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # (1, L) grows by one per step
    rope_delta: torch.Tensor  # (1, 1): multimodal position minus text position
    length: int  # tokens in the cache


def _cache_argument(inner_model: nn.Module) -> str:
    """The KV cache keyword of the model's forward: ``cache`` (transformers >= 5.2x) or the old
    ``past_key_values``; passing the right one avoids deprecation shims."""
    params = inspect.signature(inner_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _mm_token_type_ids(inputs: Mapping[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """The processor's modality ids (0 text, 1 image), rebuilt when an old processor gave none."""
    given = inputs.get("mm_token_type_ids")
    if given is not None:
        return given
    return (inputs["input_ids"] == image_token_id).to(torch.int64)


def drop_padding(inputs: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """One sequence's inputs without its padded positions (``attention_mask`` 0).

    Why: a row taken from a padded batch decodes wrong otherwise: the decode positions would
    count the pads (M-RoPE shifted by their number) and decoded tokens would attend to them,
    while for one sequence padding carries no information. Without it, 30 pads turned Hugging
    Face's own answer "pink cube" at [0, 125, 152, 339] into "blue cube" elsewhere.
    """
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape[0] != 1 or bool(mask.all()):
        return inputs
    keep = mask[0].bool()
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        value = out.get(key)
        if value is not None and value.dim() == 2 and value.shape[1] == keep.shape[0]:
            out[key] = value[:, keep]
    return out


class EagerGreedyGenerator(Generator):
    """Greedy decoding with a dynamic KV cache, one eager forward per token.

    ``numbers`` groups the coordinate tokens (:mod:`.token_choice`): a number is chosen by the
    probability of its window of values; None is plain greedy.
    """

    def __init__(self, model: nn.Module, stop_token_ids: Iterable[int], numbers: NumberTokens | None = None) -> None:
        self.model = model
        self.numbers = numbers
        self.inner = model.model
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        if not self.stop_token_ids:
            raise ValueError("greedy generation needs at least one stop token id")
        self._cache_kw = _cache_argument(self.inner)

    def _forward(self, cache: DynamicCache, **kwargs: torch.Tensor | None) -> torch.Tensor:
        """The language model's final-norm hidden states (the lm_head is applied to the last only)."""
        out = self.inner(**kwargs, **{self._cache_kw: cache}, use_cache=True, return_dict=True)
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden[:, -1:, :])[:, -1, :].float()

    @torch.inference_mode()
    def prefill(self, inputs: Mapping[str, torch.Tensor]) -> tuple[DecodeState, torch.Tensor]:
        """Runs the prompt (and the frame's one vision pass); returns the state and next logits."""
        inputs = drop_padding(inputs)
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError("EagerGreedyGenerator decodes one sequence at a time")
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        grid = inputs.get("image_grid_thw")
        mm_types = _mm_token_type_ids(inputs, self.model.config.image_token_id)
        rope_positions, rope_delta = self.inner.get_rope_index(
            input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid, attention_mask=attention_mask
        )
        length = input_ids.shape[1]
        text_positions = torch.arange(length, device=input_ids.device).view(1, 1, -1)
        position_ids = torch.cat([text_positions, rope_positions], dim=0)
        cache = DynamicCache(config=self.model.config)
        hidden = self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=grid,
            cache=cache,
        )
        state = DecodeState(cache=cache, attention_mask=attention_mask, rope_delta=rope_delta, length=length)
        return state, self._logits(hidden)

    @torch.inference_mode()
    def decode_step(self, state: DecodeState, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds one token; returns (next-token logits (1, V) float32, its hidden state (D,))."""
        device = state.attention_mask.device
        token = torch.tensor([[token_id]], dtype=torch.long, device=device)
        state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((1, 1))], dim=1)
        text_position = torch.full((1, 1, 1), state.length, dtype=torch.long, device=device)
        rope_position = (text_position + state.rope_delta.to(device)).expand(3, 1, 1)
        hidden = self._forward(
            input_ids=token,
            attention_mask=state.attention_mask,
            position_ids=torch.cat([text_position, rope_position], dim=0),
            cache=state.cache,
        )
        state.length += 1
        return self._logits(hidden), hidden[0, -1]

    def generate(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> GenerationOutput:
        state, logits = self.prefill(inputs)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        hiddens: list[torch.Tensor] = []
        finished = False
        for _ in range(max(0, int(max_new_tokens))):
            token, prob = pick_tokens(logits, self.numbers)
            probs.append(prob[0])
            tokens.append(int(token.item()))
            if tokens[-1] in self.stop_token_ids:
                finished = True
                break
            logits, hidden = self.decode_step(state, tokens[-1])
            hiddens.append(hidden)
        hidden_dim = self.model.config.text_config.hidden_size
        device = state.attention_mask.device
        return GenerationOutput(
            token_ids=torch.tensor(tokens, dtype=torch.long),
            token_probs=torch.stack(probs).float().cpu() if probs else torch.zeros(0),
            hidden_states=torch.stack(hiddens) if hiddens else torch.zeros(0, hidden_dim, device=device),
            finished=finished,
        )
