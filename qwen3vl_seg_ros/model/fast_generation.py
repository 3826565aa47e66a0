"""Fast greedy generation for Qwen3-VL on a GPU: static KV cache, CUDA graphs, optional torch.compile.

:class:`FastGreedyGenerator` implements the :class:`~qwen3vl_seg_ros.model.generation.Generator`
interface with the same results as :class:`~qwen3vl_seg_ros.model.generation.EagerGreedyGenerator`
(tokens, token probabilities, final-norm hidden states, same conventions), but runs each frame as
a few CUDA-graph replays instead of thousands of eagerly launched kernels:

* **Prefill** (one vision pass + the prompt) is our own forward over the Hugging Face modules'
  weights: the vision tower for a fixed patch grid (one graph per camera resolution), then the
  language model over the prompt right-padded to a multiple of :data:`PROMPT_BUCKET` tokens
  (causal attention makes the padding invisible to real tokens; one graph per padded length,
  captured at warm-up or the second time a frame size and length bucket is seen, so a stream of
  varied sizes runs the same code eagerly instead), writing keys and values straight into the
  static cache. The vision modules' forward hooks
  (:class:`~qwen3vl_seg_ros.model.vision_capture.VisionCapture`) are fired with the captured
  block outputs, so the mask decoder still reuses the frame's single vision pass.
* **Decode** of text tokens is a plain Qwen3 decoder step (deepstack only touches image
  positions): RMSNorm, q/k/v projections, per-head q/k norms, rotary embedding, grouped-query
  attention over a static cache with a length mask computed on the device, SiLU-gated MLP, final
  norm, lm_head, argmax, the chosen token's probability. For text after the image the three
  M-RoPE position components are equal (``cache length + rope delta``), so the rotary embedding
  reduces to 1-D RoPE with the model's ``inv_freq`` whatever the M-RoPE layout. One step is one
  graph replay that feeds its own argmax back, so steps chain without building inputs on the
  host; the host reads the new token every ``check_every`` steps (1 by default: a sync costs
  ~20 us, less than one wasted step) and trims anything generated after a stop token.
* With ``compile=True`` each decoder layer's step (one function shared by all layers, the
  weights are arguments) and the output head are compiled by Inductor before capture, which
  fuses the ~45 kernels of a layer's step (7 of them matrix-vector products) into ~15. The
  compilation cache (``TORCHINDUCTOR_CACHE_DIR``, set from ``compile_cache_dir``) makes later
  starts faster.

Everything falls back rather than fails: a single sequence's padding is dropped first
(:func:`~qwen3vl_seg_ros.model.generation.drop_padding`); inputs the fast prefill does not cover
(several images, no image, hooks it cannot emulate) use the Hugging Face prefill and copy its
cache (video inputs are not supported by either path); a failed
compilation uses the uncompiled step; a failed capture runs the same step eagerly; a failed
self-check (:meth:`FastGreedyGenerator.self_check`, run by :meth:`FastGreedyGenerator.warmup`)
retries without compilation, then hands everything to the eager generator; an exception in the
fast path at run time answers that call eagerly and switches to the eager generator for good
(logged; an input the eager generator refuses too is the input's fault and changes nothing). Weights are the
model's own tensors (no copies), read when a graph is captured: replace weights in place
(``copy_``); after swapping in other tensors, build a new generator.

:class:`FastInputs` builds the processor's outputs on the GPU (a uint8 upload, a per-channel
lookup table made with the image processor's own rescale/normalize, and the patch layout) for
frames whose size the processor would not resample; it checks itself against the processor
on the first frame of each size and steps aside when they differ.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_seg_ros.model.cuda_graph import capture_graph
from qwen3vl_seg_ros.model.generation import (
    EagerGreedyGenerator,
    GenerationOutput,
    Generator,
    _mm_token_type_ids,
    drop_padding,
)
from qwen3vl_seg_ros.model.token_choice import NumberTokens, pick_tokens

log = logging.getLogger(__name__)

#: KV cache capacities are multiples of this, doubled as needed (attention reads the whole cache;
#: 1024 slots cost ~0.05 ms per step for the 4B model).
CAPACITY_BUCKET = 1024
#: Prompts are right-padded to a multiple of this many tokens in graph mode (one graph per length).
PROMPT_BUCKET = 64
#: Environment switch: QWEN3VL_SEG_COMPILE=0 disables torch.compile of the decode step.
COMPILE_ENV = "QWEN3VL_SEG_COMPILE"

ProgressFn = Callable[[str], None]


class FastPathUnavailableError(RuntimeError):
    """The model is not one the fast path implements; use :class:`EagerGreedyGenerator`."""


def _say(progress: ProgressFn | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)


def compile_enabled_by_env(default: bool = True) -> bool:
    """``QWEN3VL_SEG_COMPILE`` = 0/false/no/off disables compilation; unset keeps ``default``."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


def configure_compile_cache(cache_dir: str | os.PathLike | None) -> str:
    """Points Inductor's persistent caches (FX graphs, Triton kernels) at ``cache_dir``.

    Must run before the first compilation of the process to take effect. An empty value keeps
    ``TORCHINDUCTOR_CACHE_DIR`` or Inductor's default (``/tmp/torchinductor_<user>``). Returns
    the folder in use.
    """
    if cache_dir:
        path = os.path.abspath(os.path.expanduser(str(cache_dir)))
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = True
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

        return inductor_cache_dir()
    except Exception:
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(Inductor default)")


# ---------------------------------------------------------------------------------------------
# model structure
# ---------------------------------------------------------------------------------------------


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast decode cannot run this model (None when it can)."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a Qwen3-VL model"
    cfg = lm.config
    if getattr(cfg, "attention_bias", False):
        return "attention projections with biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope type {rope.get('rope_type')}"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return "sliding-window layers"
    if type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None:
        return "a wrapped or biased lm_head (e.g. an unmerged adapter)"
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return "wrapped or biased projections (e.g. an unmerged LoRA adapter)"
    return None


@dataclass
class _Spec:
    """Sizes of the language model."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float
    rope_scaling: float
    vocab: int


def _spec(model: nn.Module) -> _Spec:
    lm = model.model.language_model
    cfg = lm.config
    attn = lm.layers[0].self_attn
    head_dim = int(attn.head_dim)
    return _Spec(
        layers=len(lm.layers), hidden=int(cfg.hidden_size), heads=int(cfg.num_attention_heads),
        kv_heads=int(cfg.num_key_value_heads), head_dim=head_dim, eps=float(cfg.rms_norm_eps),
        scale=float(attn.scaling), rope_scaling=float(getattr(lm.rotary_emb, "attention_scaling", 1.0)),
        vocab=int(model.lm_head.weight.shape[0]),
    )


# ---------------------------------------------------------------------------------------------
# the decode step (pure functions: compiled once, shared by every layer)
# ---------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm as Hugging Face computes it: float32 statistics, the normalised value rounded
    once to the input dtype, then times the weight. ``F.rms_norm`` computes the first part in
    float32 internally, in one fused kernel on a GPU where HF's formula takes seven (same math; the
    reduction order may differ in the last bit)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def decode_layer(x: torch.Tensor, ln1: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                 wo: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, ln2: torch.Tensor, wg: torch.Tensor,
                 wu: torch.Tensor, wd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 pos: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor, bias: torch.Tensor,
                 eps: float, heads: int, kv_heads: int, scale: float) -> torch.Tensor:
    """One Qwen3 decoder layer for one token ``x`` (1, D) at cache index ``pos`` (1,).

    ``cos`` and ``sin_rot`` (1, head_dim) come from :func:`text_rope` and :func:`rotated_sin`:
    ``roll(q, half) * sin_rot`` equals HF's ``rotate_half(q) * sin`` exactly, in fewer kernels.
    Writes the token's key and value into ``k_cache``/``v_cache`` (kv_heads, capacity, head_dim)
    and attends over the whole cache with ``bias`` (capacity,) = 0 for filled slots, -inf after.
    """
    head_dim = qn.shape[0]
    half = head_dim // 2
    h = _rms_norm(x, ln1, eps)
    q = _rms_norm(F.linear(h, wq).view(heads, head_dim), qn, eps)
    k = _rms_norm(F.linear(h, wk).view(kv_heads, head_dim), kn, eps)
    v = F.linear(h, wv).view(kv_heads, head_dim)
    q = q * cos + torch.roll(q, half, dims=-1) * sin_rot
    k = k * cos + torch.roll(k, half, dims=-1) * sin_rot
    k_cache.index_copy_(1, pos, k.unsqueeze(1))
    v_cache.index_copy_(1, pos, v.unsqueeze(1))
    grouped = q.view(kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, k_cache.transpose(1, 2)).to(torch.float32) * scale + bias
    attn = torch.matmul(torch.softmax(scores, dim=-1).to(x.dtype), v_cache)
    x = x + F.linear(attn.reshape(1, heads * head_dim), wo)
    h = _rms_norm(x, ln2, eps)
    return x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)


def decode_head(x: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, eps: float,
                numbers: NumberTokens | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final norm (the hidden state), the chosen token and its probability, for ``x`` (1, D)."""
    h = _rms_norm(x, norm, eps)
    logits = F.linear(h, lm_head).to(torch.float32)
    token, prob = pick_tokens(logits, numbers)
    return h, token, prob


def text_rope(position: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (N, head_dim) for text positions ``position`` (N,), whose M-RoPE components are equal."""
    freqs = position.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotated_sin(sin: torch.Tensor) -> torch.Tensor:
    """``cat(-sin[:half], sin[half:])``: with ``roll(x, half)`` it gives ``rotate_half(x) * sin``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


# ---------------------------------------------------------------------------------------------
# hooks of the vision modules the fast prefill bypasses
# ---------------------------------------------------------------------------------------------


def _fire_pre_hooks(module: nn.Module, args: tuple) -> None:
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, args, {})
        else:
            hook(module, args)


def _fire_forward_hooks(module: nn.Module, args: tuple, output: Any) -> None:
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            hook(module, args, {}, output)
        else:
            hook(module, args, output)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# ---------------------------------------------------------------------------------------------
# static buffers
# ---------------------------------------------------------------------------------------------


@dataclass
class _VisionEntry:
    """The vision pass for one patch grid: constants, static input/outputs, graph."""

    grid: tuple[int, int, int]
    interp_indices: torch.Tensor
    interp_weights: torch.Tensor
    position_ids: torch.Tensor
    pixel: torch.Tensor | None = None
    blocks: list[torch.Tensor] = field(default_factory=list)
    merged: torch.Tensor | None = None
    deepstack: list[torch.Tensor] = field(default_factory=list)
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class _PrefillEntry:
    """Static inputs and graph of the language-model prefill for one padded prompt length."""

    ids: torch.Tensor  # (1, P)
    pos3: torch.Tensor  # (3, 1, P)
    img_pos: torch.Tensor  # (N,)
    last: torch.Tensor  # (1,)
    delta: torch.Tensor  # (1,)
    graph: torch.cuda.CUDAGraph


class _State:
    """KV cache and decode buffers for one capacity; the graphs that write into them."""

    def __init__(self, spec: _Spec, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.capacity = capacity
        shape = (spec.kv_heads, capacity, spec.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.layers)]
        long = dict(device=device, dtype=torch.long)
        self.cur_tok = torch.zeros(1, **long)
        self.pos = torch.zeros(1, **long)
        self.delta = torch.zeros(1, **long)
        self.step = torch.zeros(1, **long)
        self.arange = torch.arange(capacity, **long)
        self.zero = torch.zeros((), device=device, dtype=torch.float32)
        self.neg_inf = torch.full((), float("-inf"), device=device, dtype=torch.float32)
        self.tok_out = torch.zeros(capacity + 1, **long)
        self.prob_out = torch.zeros(capacity + 1, device=device, dtype=torch.float32)
        self.hid_out = torch.zeros(capacity + 1, spec.hidden, device=device, dtype=dtype)
        self.prefill_hidden = torch.zeros(1, spec.hidden, device=device, dtype=dtype)
        self.step_graph: torch.cuda.CUDAGraph | None = None
        self.prefills: OrderedDict[tuple, _PrefillEntry] = OrderedDict()


@dataclass
class _Plan:
    """Host-side preparation of one prompt."""

    length: int
    padded: int
    fast: bool
    reason: str = ""
    grid: tuple[int, int, int] | None = None
    ids: torch.Tensor | None = None  # (1, P) CPU
    pos3: torch.Tensor | None = None  # (3, 1, P) CPU
    img_pos: torch.Tensor | None = None  # (N,) CPU
    delta: int = 0


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def capacity_for(tokens: int) -> int:
    """The KV capacity bucket holding ``tokens``: 1024, 2048, 4096, ..."""
    capacity = CAPACITY_BUCKET
    while capacity < tokens:
        capacity *= 2
    return capacity


def _capture(fn: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Captures ``fn`` (errors from other threads during capture do not abort it)."""
    return capture_graph(fn, device, capture_error_mode="thread_local")


# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------


class FastGreedyGenerator(Generator):
    """Greedy decoding over a static KV cache, replayed as CUDA graphs on a GPU.

    ``use_graphs`` (default: on CUDA) captures the prefill and the decode step; without it the
    same code runs eagerly (on a CPU: for tests). ``compile`` compiles the decode step with
    Inductor first (GPU only by default, see :func:`compile_enabled_by_env`). ``check_every``
    is how many steps run between reads of the new tokens.
    """

    def __init__(self, model: nn.Module, stop_token_ids: Iterable[int], *, use_graphs: bool | None = None,
                 compile: bool = False, compile_cache_dir: str = "", check_every: int = 1,
                 numbers: NumberTokens | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise FastPathUnavailableError(f"fast decoding does not support this model: {reason}")
        self.model = model
        self.inner = model.model
        self.lm = model.model.language_model
        self.visual = getattr(model.model, "visual", None)
        self._eager = EagerGreedyGenerator(model, stop_token_ids, numbers)
        self.stop_token_ids = self._eager.stop_token_ids
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.spec = _spec(model)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else bool(use_graphs)
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.check_every = max(1, int(check_every))
        self.compile_requested = bool(compile)
        self.compile_cache = ""
        self.compiled = False
        self.compile_error = ""
        self.eager_only = False
        self.fallbacks = 0  # run-time failures that went to the eager generator (the segmenter reads it)
        self.notes: list[str] = []
        self._layer_fn: Callable[..., torch.Tensor] = decode_layer
        self._head_fn: Callable[..., tuple] = decode_head
        if self.compile_requested:
            self.compile_cache = configure_compile_cache(compile_cache_dir)
            self._set_compiled()
        self._graph_steps = self.use_graphs
        self._graph_prefill = self.use_graphs
        self._state: _State | None = None
        self._vision: OrderedDict[tuple, _VisionEntry] = OrderedDict()
        #: Prefill graphs are captured the ``capture_after``-th time a frame size and prompt bucket
        #: is seen (always at warm-up).
        self.capture_after = 2
        self._seen: dict[tuple, int] = {}
        self._force_capture = False
        self._vision_problem = self._vision_unsupported()
        self.image_token_id = int(model.config.image_token_id)

    # ------------------------------------------------------------------------------ properties

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_token_ids

    @stop_token_ids.setter
    def stop_token_ids(self, ids: Iterable[int]) -> None:
        self._stop_token_ids = frozenset(int(t) for t in ids)
        if not self._stop_token_ids:
            raise ValueError("greedy generation needs at least one stop token id")
        self._eager.stop_token_ids = self._stop_token_ids

    @property
    def eager(self) -> EagerGreedyGenerator:
        """The reference generator (used as the fallback)."""
        return self._eager

    @property
    def numbers(self) -> NumberTokens | None:
        """The coordinate tokens, shared with the eager twin so both pick numbers alike."""
        return self._eager.numbers

    def describe(self) -> str:
        """One line saying which path runs."""
        if self.eager_only:
            return "eager decoding (the fast path was disabled: " + "; ".join(self.notes[-1:]) + ")"
        cap = self._state.capacity if self._state is not None else 0
        decode = f"static KV cache ({cap} tokens)" if cap else "static KV cache"
        decode += " + CUDA graphs" if self._graph_steps else " (eager steps)"
        if self.compiled:
            decode += " + torch.compile (Inductor)"
        elif self.compile_requested:
            decode += " (compile failed: uncompiled step)"
        prefill = "CUDA graphs" if self._graph_prefill else "eager"
        if self._vision_problem:
            prefill = f"Hugging Face ({self._vision_problem})"
        return f"decode: {decode}; prefill: {prefill}"

    # ------------------------------------------------------------------------------ compile

    def _set_compiled(self) -> None:
        try:
            import torch._dynamo as dynamo

            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(int(getattr(dynamo.config, name)), 64))
            self._layer_fn = torch.compile(decode_layer, fullgraph=True, dynamic=False)
            self._head_fn = torch.compile(decode_head, fullgraph=True, dynamic=False)
            self.compiled = True
        except Exception as exc:
            self._uncompile(exc)

    def _uncompile(self, exc: BaseException) -> None:
        self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
        self.notes.append(f"torch.compile failed, using the uncompiled step ({self.compile_error})")
        log.warning(self.notes[-1])
        self._layer_fn, self._head_fn = decode_layer, decode_head
        self.compiled = False

    # ------------------------------------------------------------------------------ planning

    def _vision_unsupported(self) -> str:
        visual = self.visual
        if visual is None or not hasattr(visual, "blocks") or not hasattr(visual, "merger"):
            return "no Qwen3-VL vision tower"
        try:
            from transformers.vision_utils import (  # noqa: F401
                get_vision_interpolation_indices_and_weights,
                get_vision_position_ids,
            )
        except ImportError:
            return "this transformers version lacks vision_utils"
        needed = ("patch_embed", "pos_embed", "rotary_pos_emb", "deepstack_merger_list", "num_grid_per_side")
        missing = [n for n in needed if not hasattr(visual, n)]
        if missing:
            return f"vision tower without {', '.join(missing)}"
        return ""

    def _hooks_block_fast_prefill(self) -> str:
        """Vision hooks the fast prefill could not honour: only a pre-hook on the tower and forward
        hooks on its blocks and merger (what VisionCapture uses) are fired. Hooks on the language
        model's modules are not fired by the fast path."""
        visual = self.visual
        if visual._forward_hooks:
            return "forward hooks on the vision tower"
        allowed = {id(visual), id(visual.merger), *(id(b) for b in visual.blocks)}
        for module in visual.modules():
            if id(module) in allowed:
                if module is not visual and module._forward_pre_hooks:
                    return "pre-hooks on vision blocks"
                continue
            if _hooked(module):
                return "hooks inside the vision tower"
        return ""

    def _plan(self, inputs: Mapping[str, torch.Tensor]) -> _Plan:
        """How to prefill ``inputs`` (already without padding: :func:`drop_padding`)."""
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError("FastGreedyGenerator decodes one sequence at a time")
        length = int(input_ids.shape[1])
        padded = _round_up(length, PROMPT_BUCKET) if self._graph_prefill else length

        def hf(reason: str) -> _Plan:
            return _Plan(length=length, padded=length, fast=False, reason=reason)

        if self._vision_problem:
            return hf(self._vision_problem)
        grid, pixels = inputs.get("image_grid_thw"), inputs.get("pixel_values")
        if inputs.get("pixel_values_videos") is not None or grid is None or pixels is None or grid.shape[0] != 1:
            return hf("not exactly one image")
        hooks = self._hooks_block_fast_prefill()
        if hooks:
            return hf(hooks)
        grid_cpu = grid.detach().to("cpu")
        t, gh, gw = (int(v) for v in grid_cpu[0].tolist())
        merge = int(self.visual.spatial_merge_size)
        ids_cpu = input_ids[0].detach().to("cpu")
        img_pos = torch.nonzero(ids_cpu == self.image_token_id)[:, 0]
        if t != 1 or img_pos.numel() != gh * gw // (merge * merge):
            return hf("image tokens do not match the image grid")
        mm = _mm_token_type_ids(inputs, self.image_token_id).detach().to("cpu")
        rope, delta = self.inner.get_rope_index(ids_cpu[None], mm_token_type_ids=mm, image_grid_thw=grid_cpu,
                                                attention_mask=None)
        ids = torch.zeros(1, padded, dtype=torch.long)
        ids[0, :length] = ids_cpu
        pos3 = torch.empty(3, 1, padded, dtype=torch.long)
        pos3[:, :, :length] = rope.to(torch.long)
        if padded > length:
            start = int(rope.max()) + 1
            pos3[:, :, length:] = torch.arange(start, start + padded - length)
        return _Plan(length=length, padded=padded, fast=True, grid=(t, gh, gw), ids=ids, pos3=pos3,
                     img_pos=img_pos, delta=int(delta.reshape(-1)[0]))

    def _state_for(self, plan: _Plan, max_new_tokens: int) -> _State:
        needed = max(plan.length + max_new_tokens, plan.padded)
        state = self._state
        if state is None or state.capacity < needed:
            self._state = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            state = _State(self.spec, capacity_for(needed), self.device, self.dtype)
            self._state = state
        return state

    # ------------------------------------------------------------------------------ vision

    def _vision_entry(self, grid: tuple[int, int, int], keep: bool = True) -> _VisionEntry:
        """The grid's vision tables, cached (the newest 4 grids) when ``keep``. A frame that runs
        its prefill eagerly must not ``keep``: four sizes seen once each evicted the camera size's
        warmed graphs, which the next camera frame then captured again."""
        entry = self._vision.get(grid)
        if entry is not None:
            self._vision.move_to_end(grid)
            return entry
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        visual = self.visual
        grid_thw = torch.tensor([grid], dtype=torch.long, device=self.device)
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size,
            kwargs={})
        position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size, kwargs={})
        entry = _VisionEntry(grid=grid, interp_indices=indices, interp_weights=weights, position_ids=position_ids)
        if not keep:
            return entry
        self._vision[grid] = entry
        while len(self._vision) > 4:
            self._forget_grid(self._vision.popitem(last=False)[0])
        self._forget_grid(grid, keep_vision=True)  # prefill graphs bound to an evicted entry's outputs
        return entry

    def _forget_grid(self, grid: tuple[int, int, int], keep_vision: bool = False) -> None:
        """Drops the prefill graphs that read a grid's vision outputs (and its vision entry)."""
        if not keep_vision:
            self._vision.pop(grid, None)
        if self._state is not None:
            for key in [k for k in self._state.prefills if k[0] == grid]:
                del self._state.prefills[key]

    def _vision_attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
        """Qwen3VLVisionAttention for one image (no host sync)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, is_causal=False)
        return attn.proj(out.transpose(1, 2).reshape(n, -1).contiguous())

    def _vision_forward(self, entry: _VisionEntry,
                        pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """The vision tower's forward for one image: block outputs, merged tokens, deepstack."""
        visual = self.visual
        hidden = visual.patch_embed(pixels)
        pos_embeds = (visual.pos_embed(entry.interp_indices) * entry.interp_weights[:, :, None]).sum(1)
        hidden = hidden + pos_embeds.to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, entry.position_ids)
        deepstack_index = {int(i): k for k, i in enumerate(visual.deepstack_visual_indexes)}
        blocks, deepstack = [], []
        for index, block in enumerate(visual.blocks):
            hidden = hidden + self._vision_attention(block.attn, block.norm1(hidden), cos, sin)
            hidden = hidden + block.mlp(block.norm2(hidden))
            blocks.append(hidden)
            if index in deepstack_index:
                deepstack.append(visual.deepstack_merger_list[deepstack_index[index]](hidden))
        return blocks, visual.merger(hidden), deepstack

    def _emit_vision_hooks(self, pixels: torch.Tensor, blocks: list[torch.Tensor], merged: torch.Tensor,
                           copy: bool) -> None:
        """Fires the hooks the bypassed module calls would have fired (VisionCapture's)."""
        visual = self.visual
        _fire_pre_hooks(visual, (pixels,))
        for block, out in zip(visual.blocks, blocks):
            if block._forward_hooks:
                _fire_forward_hooks(block, (), out.clone() if copy else out)
        if visual.merger._forward_hooks:
            _fire_forward_hooks(visual.merger, (), merged.clone() if copy else merged)

    # ------------------------------------------------------------------------------ prefill

    def _prefill_layer(self, index: int, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, state: _State) -> torch.Tensor:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        attn = layer.self_attn
        length = x.shape[1]
        shape = (1, length, -1, attn.head_dim)
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        state.k[index][:, :length].copy_(k[0])
        state.v[index][:, :length].copy_(v[0])
        gqa = self.spec.heads != self.spec.kv_heads
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=gqa)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(1, length, -1).contiguous())
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _llm_prefill(self, state: _State, ids: torch.Tensor, pos3: torch.Tensor, img_pos: torch.Tensor,
                     last: torch.Tensor, delta: torch.Tensor, merged: torch.Tensor,
                     deepstack: list[torch.Tensor]) -> None:
        """The language model over the prompt; fills the cache and the first token's buffers."""
        lm = self.lm
        x = lm.embed_tokens(ids)
        x = x.index_copy(1, img_pos, merged.to(x.dtype)[None])
        cos, sin = lm.rotary_emb(x, pos3)
        for index, layer in enumerate(lm.layers):
            x = self._prefill_layer(index, layer, x, cos, sin, state)
            if index < len(deepstack):
                x = x.index_copy(1, img_pos, x.index_select(1, img_pos) + deepstack[index].to(x.dtype)[None])
        hidden = lm.norm(x.index_select(1, last))[0]  # (1, D)
        logits = self.model.lm_head(hidden).to(torch.float32)
        self._set_first_token(state, logits, hidden, last + 1, delta)

    def _set_first_token(self, state: _State, logits: torch.Tensor, hidden: torch.Tensor | None, length: torch.Tensor,
                         delta: torch.Tensor) -> None:
        token, prob = pick_tokens(logits, self.numbers)
        state.tok_out[:1].copy_(token)
        state.prob_out[:1].copy_(prob)
        state.cur_tok.copy_(token)
        state.pos.copy_(length)
        state.delta.copy_(delta)
        state.step.zero_()
        if hidden is not None:
            state.prefill_hidden.copy_(hidden)

    def _prefill_entry(self, state: _State, vision: _VisionEntry, plan: _Plan) -> _PrefillEntry:
        key = (vision.grid, plan.padded)
        entry = state.prefills.get(key)
        if entry is not None:
            state.prefills.move_to_end(key)
            return entry
        long = dict(device=self.device, dtype=torch.long)
        ids = plan.ids.to(self.device)
        pos3 = plan.pos3.to(self.device)
        img_pos = plan.img_pos.to(self.device)
        last = torch.full((1,), plan.length - 1, **long)
        delta = torch.full((1,), plan.delta, **long)
        graph, _ = _capture(lambda: self._llm_prefill(state, ids, pos3, img_pos, last, delta, vision.merged,
                                                      vision.deepstack), self.device)
        entry = _PrefillEntry(ids=ids, pos3=pos3, img_pos=img_pos, last=last, delta=delta, graph=graph)
        state.prefills[key] = entry
        while len(state.prefills) > 8:
            state.prefills.popitem(last=False)
        return entry

    def _capture_vision(self, entry: _VisionEntry, pixels: torch.Tensor) -> None:
        entry.pixel = pixels.detach().to(self.dtype).clone()
        graph, (blocks, merged, deepstack) = _capture(lambda: self._vision_forward(entry, entry.pixel), self.device)
        entry.graph, entry.blocks, entry.merged, entry.deepstack = graph, blocks, merged, deepstack

    def _eager_fast_prefill(self, plan: _Plan, pixels: torch.Tensor, vision: _VisionEntry, state: _State) -> None:
        """The same prefill run op by op (no graph, no padding)."""
        length = plan.length
        pixels = pixels.to(self.dtype)
        blocks, merged, deepstack = self._vision_forward(vision, pixels)
        self._emit_vision_hooks(pixels, blocks, merged, copy=False)
        long = dict(device=self.device, dtype=torch.long)
        self._llm_prefill(state, plan.ids[:, :length].to(self.device), plan.pos3[:, :, :length].to(self.device),
                          plan.img_pos.to(self.device), torch.full((1,), length - 1, **long),
                          torch.full((1,), plan.delta, **long), merged, deepstack)

    def _fast_prefill(self, plan: _Plan, inputs: Mapping[str, torch.Tensor], state: _State) -> None:
        pixels = inputs["pixel_values"]
        key = (plan.grid, plan.padded)
        if self._graph_prefill and key not in state.prefills:
            self._seen[key] = self._seen.get(key, 0) + 1
        # Graphs for a frame size and prompt bucket seen before (or at warm-up): a stream of varied
        # sizes (evaluation) runs eagerly instead of capturing graphs it would not reuse.
        if not self._graph_prefill or (key not in state.prefills and not self._force_capture
                                       and self._seen.get(key, 0) < self.capture_after):
            self._eager_fast_prefill(plan, pixels, self._vision_entry(plan.grid, keep=False), state)
            return
        vision = self._vision_entry(plan.grid)
        try:
            if vision.graph is None:
                self._capture_vision(vision, pixels)
            entry = self._prefill_entry(state, vision, plan)
        except Exception as exc:
            self._graph_prefill = False
            self.notes.append(f"prefill capture failed, running it eagerly ({type(exc).__name__}: {exc})"[:500])
            log.warning(self.notes[-1])
            self._vision.clear()
            self._eager_fast_prefill(plan, pixels, self._vision_entry(plan.grid), state)
            return
        vision.pixel.copy_(pixels)
        entry.ids.copy_(plan.ids)
        entry.pos3.copy_(plan.pos3)
        entry.img_pos.copy_(plan.img_pos)
        entry.last.fill_(plan.length - 1)
        entry.delta.fill_(plan.delta)
        vision.graph.replay()
        self._emit_vision_hooks(pixels, vision.blocks, vision.merged, copy=True)
        entry.graph.replay()

    def _hf_prefill(self, inputs: Mapping[str, torch.Tensor], state: _State) -> None:
        """Hugging Face's prefill (any input it accepts), its cache copied into the static one."""
        decode_state, logits = self._eager.prefill(inputs)
        length = decode_state.length
        cache = decode_state.cache
        for index in range(self.spec.layers):
            if hasattr(cache, "layers"):
                keys, values = cache.layers[index].keys, cache.layers[index].values
            else:  # older transformers
                keys, values = cache.key_cache[index], cache.value_cache[index]
            state.k[index][:, :length].copy_(keys[0])
            state.v[index][:, :length].copy_(values[0])
        delta = decode_state.rope_delta.reshape(-1)[:1].to(self.device, torch.long)
        self._set_first_token(state, logits, None, torch.full((1,), length, device=self.device, dtype=torch.long),
                              delta)

    def _prefill(self, plan: _Plan, inputs: Mapping[str, torch.Tensor], state: _State) -> None:
        if plan.fast:
            self._fast_prefill(plan, inputs, state)
        else:
            self._hf_prefill(inputs, state)

    # ------------------------------------------------------------------------------ decode

    def _layer_weights(self) -> list[tuple[torch.Tensor, ...]]:
        weights = []
        for layer in self.lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            weights.append((layer.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                            attn.o_proj.weight, attn.q_norm.weight, attn.k_norm.weight,
                            layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
                            mlp.down_proj.weight))
        return weights

    def _step_body(self, state: _State) -> None:
        """One decode step, all on the device: feed ``cur_tok`` at ``pos``, record, advance."""
        spec = self.spec
        x = F.embedding(state.cur_tok, self.lm.embed_tokens.weight)
        cos, sin = text_rope(state.pos + state.delta, self.lm.rotary_emb.inv_freq, spec.rope_scaling, x.dtype)
        sin_rot = rotated_sin(sin)
        bias = torch.where(state.arange <= state.pos, state.zero, state.neg_inf)
        for index, weights in enumerate(self._layer_weights()):
            x = self._layer_fn(x, *weights, state.k[index], state.v[index], state.pos, cos, sin_rot, bias,
                               spec.eps, spec.heads, spec.kv_heads, spec.scale)
        hidden, token, prob = self._head_fn(x, self.lm.norm.weight, self.model.lm_head.weight, spec.eps,
                                            self.numbers)
        state.hid_out.index_copy_(0, state.step, hidden)
        following = state.step + 1
        state.tok_out.index_copy_(0, following, token)
        state.prob_out.index_copy_(0, following, prob)
        state.cur_tok.copy_(token)
        state.pos.add_(1)
        state.step.add_(1)

    def _run_body_checked(self, state: _State) -> None:
        """Runs the step once, dropping compilation if the compiled step fails."""
        try:
            self._step_body(state)
        except Exception as exc:
            if not self.compiled:
                raise
            self._uncompile(exc)
            self._step_body(state)

    def _ensure_step_graph(self, state: _State) -> None:
        if state.step_graph is not None or not self._graph_steps:
            return
        state.pos.zero_()
        state.step.zero_()
        try:
            # Compilation (if any) happens here, outside capture.
            self._run_body_checked(state)
            state.pos.zero_()
            state.step.zero_()
            graph, _ = _capture(lambda: self._step_body(state), self.device)
        except Exception as exc:
            self._graph_steps = False
            self.notes.append(f"decode step capture failed, running it eagerly ({type(exc).__name__}: {exc})"[:500])
            log.warning(self.notes[-1])
            return
        state.step_graph = graph

    def _step(self, state: _State) -> None:
        if state.step_graph is not None:
            state.step_graph.replay()
        else:
            self._run_body_checked(state)

    # ------------------------------------------------------------------------------ generate

    def generate(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> GenerationOutput:
        if self.eager_only:
            return self._eager.generate(inputs, max_new_tokens)
        inputs = drop_padding(inputs)
        try:
            return self._generate(inputs, max_new_tokens)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            # An input that neither path takes (a batch of two) raises here again: that is the
            # input's fault, and the fast path stays on for the next call.
            result = self._eager.generate(inputs, max_new_tokens)
            self.eager_only = True
            self.fallbacks += 1
            self.notes.append(f"the fast path failed ({type(exc).__name__}: {exc}); decoding eagerly from now on"[:500])
            log.error(self.notes[-1])
            return result

    def _generate(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> GenerationOutput:
        limit = max(0, int(max_new_tokens))
        # Graphs replay on the current device: the node's worker thread may not have set it.
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), device:
            plan = self._plan(inputs)
            state = self._state_for(plan, limit)
            self._ensure_step_graph(state)
            self._prefill(plan, inputs, state)
            if limit == 0:
                return GenerationOutput(torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                        torch.zeros(0, self.spec.hidden, device=self.device, dtype=self.dtype), False)
            tokens = [int(state.tok_out[0].item())]
            finished = tokens[0] in self.stop_token_ids
            steps = 0
            while not finished and steps < limit:
                chunk = min(self.check_every, limit - steps)
                for _ in range(chunk):
                    self._step(state)
                new = state.tok_out[steps + 1: steps + 1 + chunk].tolist()
                steps += chunk
                for token in new:
                    if len(tokens) >= limit:
                        break
                    tokens.append(int(token))
                    if tokens[-1] in self.stop_token_ids:
                        finished = True
                        break
            count = len(tokens)
            return GenerationOutput(
                token_ids=torch.tensor(tokens, dtype=torch.long),
                token_probs=state.prob_out[:count].to(torch.float32).cpu(),
                hidden_states=state.hid_out[: count - int(finished)].clone(),
                finished=finished,
            )

    # ------------------------------------------------------------------------------ checks

    @torch.inference_mode()
    def teacher_forced(self, inputs: Mapping[str, torch.Tensor],
                       token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill, then feeds ``token_ids`` one per step (whatever the step predicts).

        Returns the prefill's final-norm state at the last prompt token (D,), the hidden state of
        each fed token (T, D), the predicted next tokens (T + 1,: the prefill's, then each
        step's) and their probabilities (T + 1,).
        """
        inputs = drop_padding(inputs)
        plan = self._plan(inputs)
        state = self._state_for(plan, len(token_ids) + 1)
        self._ensure_step_graph(state)
        self._prefill(plan, inputs, state)
        for token in token_ids:
            state.cur_tok.fill_(int(token))
            self._step(state)
        count = len(token_ids)
        if not plan.fast:  # the Hugging Face prefill keeps no hidden state
            state.prefill_hidden.zero_()
        return (state.prefill_hidden[0].clone(), state.hid_out[:count].clone(), state.tok_out[:count + 1].cpu(),
                state.prob_out[:count + 1].cpu())

    def self_check(self, inputs: Mapping[str, torch.Tensor], steps: int = 8) -> dict[str, Any]:
        """Compares this path with the eager reference on ``inputs``.

        Teacher-forced on the eager tokens, so one near-tie cannot derail the comparison:
        ``hidden_cos_min`` (cosine of each step's hidden state), ``token_agreement`` (same
        greedy choice), ``prob_max_abs_diff`` (where they agree); plus ``tokens_equal`` of the
        free-running generations. ``ok`` requires hidden states and prefill logits within
        cosine 0.99 of the reference (bf16 noise is ~1e-4); exact token equality is reported,
        not required, as bf16 near-ties may flip.
        """
        steps = max(1, int(steps))
        with torch.inference_mode():
            ref = self._eager.generate(inputs, steps)
            ref_tokens = ref.token_ids.tolist()
            fed = ref_tokens[: ref.hidden_states.shape[0]]
            prefill_hidden, hidden, predicted, probs = self.teacher_forced(inputs, fed)
            _, ref_logits = self._eager.prefill(inputs)
            result: dict[str, Any] = {"steps": len(fed)}
            plan_fast = self._plan(inputs).fast
            if plan_fast:
                fast_logits = self.model.lm_head(prefill_hidden[None]).float()
                result["prefill_logits_cos"] = float(F.cosine_similarity(fast_logits, ref_logits, dim=-1)[0])
            expected = ref_tokens[: len(fed) + 1]
            agree = [int(p) == e for p, e in zip(predicted.tolist(), expected)]
            result["token_agreement"] = f"{sum(agree)}/{len(agree)}"
            result["token_agreement_fraction"] = sum(agree) / max(1, len(agree))
            if len(fed):
                cos = F.cosine_similarity(hidden.float(), ref.hidden_states[: len(fed)].float(), dim=-1)
                result["hidden_cos_min"] = float(cos.min())
                diff = hidden.float() - ref.hidden_states[: len(fed)].float()
                result["hidden_max_abs_diff"] = float(diff.abs().max())
            ref_probs = ref.token_probs[: len(agree)]
            diffs = [abs(float(p) - float(r)) for p, r, a in zip(probs.tolist(), ref_probs.tolist(), agree) if a]
            result["prob_max_abs_diff"] = max(diffs) if diffs else None
            free = self.generate(inputs, steps)
            result["tokens_equal"] = free.token_ids.tolist() == ref_tokens
            result["ok"] = (result.get("prefill_logits_cos", 1.0) >= 0.99
                            and result.get("hidden_cos_min", 1.0) >= 0.99)
        return result

    # ------------------------------------------------------------------------------ warm-up

    def warmup(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int, progress: ProgressFn | None = None,
               prompt_buckets: int = 2, check: bool = True) -> dict[str, Any]:
        """Compiles and captures everything a command like ``inputs`` needs, then self-checks.

        ``max_new_tokens`` must be the limit real commands use (it sizes the KV cache);
        ``prompt_buckets`` prefill graphs are captured (this prompt's padded length and the next
        ones, for longer commands). A failed self-check hands decoding to the eager generator.
        Returns timings and the check's figures.
        """
        info: dict[str, Any] = {}
        if self.eager_only:
            return info
        start = time.perf_counter()
        with torch.inference_mode():
            plan = self._plan(inputs)
            state = self._state_for(plan, max(1, int(max_new_tokens)))
            if self._graph_steps:
                what = "compiling (torch.compile) and capturing" if self.compiled else "capturing"
                cache = f"; compilation cache: {self.compile_cache}" if self.compiled else ""
                _say(progress, f"fast decode: {what} the decode step for a {state.capacity}-token KV cache{cache}")
                t0 = time.perf_counter()
                self._ensure_step_graph(state)
                info["decode_graph_s"] = time.perf_counter() - t0
            if plan.fast and self._graph_prefill:
                t0 = time.perf_counter()
                patch = int(getattr(self.visual, "patch_size", 16))
                size = f"{plan.grid[2] * patch}x{plan.grid[1] * patch}"
                _say(progress, f"fast decode: capturing the prefill for a {size} frame (prompt buckets of "
                               f"{PROMPT_BUCKET} tokens)")
                self._force_capture = True
                try:
                    self._prefill(plan, inputs, state)
                    for extra in range(1, max(1, prompt_buckets)):
                        padded = plan.padded + extra * PROMPT_BUCKET
                        if padded > state.capacity or not self._graph_prefill:
                            break
                        tail = torch.arange(1, padded - plan.padded + 1)
                        longer = _Plan(length=plan.length, padded=padded, fast=True, grid=plan.grid, delta=plan.delta,
                                       ids=F.pad(plan.ids, (0, padded - plan.padded)),
                                       pos3=torch.cat([plan.pos3, plan.pos3[:, :, -1:] + tail], dim=2),
                                       img_pos=plan.img_pos)
                        self._prefill(longer, inputs, state)
                finally:
                    self._force_capture = False
                info["prefill_graphs_s"] = time.perf_counter() - t0
            elif not plan.fast:
                info["prefill"] = f"Hugging Face prefill ({plan.reason})"
        if check:
            t0 = time.perf_counter()
            steps = min(8, max(1, int(max_new_tokens)))
            result = self.self_check(inputs, steps=steps)
            if not result["ok"] and self.compiled:  # a miscompiled step: try the uncompiled one
                self._uncompile(RuntimeError(f"the compiled step failed the self-check ({result})"))
                if self._state is not None:
                    self._state.step_graph = None
                info["self_check_compiled"] = result
                result = self.self_check(inputs, steps=steps)
            info["self_check"] = result
            info["self_check_s"] = time.perf_counter() - t0
            if not result["ok"]:
                self.eager_only = True
                self.notes.append(f"self-check against the eager path failed ({result})")
                log.warning(self.notes[-1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        info["warmup_s"] = time.perf_counter() - start
        info["path"] = self.describe()
        _say(progress, f"fast decode ready in {info['warmup_s']:.1f} s: {info['path']}")
        return info


# ---------------------------------------------------------------------------------------------
# processor outputs built on the GPU
# ---------------------------------------------------------------------------------------------


class FastInputs:
    """Builds ``processor(text=[prompt], images=[rgb])`` on the device for frames it need not resample.

    Pixel values: the uint8 frame is uploaded, mapped through a per-channel table made with the
    image processor's own ``rescale``/``normalize`` (so values are bit-identical), and arranged in
    the processor's patch order. Text: the chat prompt with the image placeholder expanded,
    tokenized. The first frame of each size is checked against the processor (exact equality);
    on any difference, or when the processor would resize the frame, :meth:`__call__` returns
    None and the caller uses the processor.
    """

    def __init__(self, processor: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.processor = processor
        self.device, self.dtype = device, dtype
        image_processor = processor.image_processor
        self.patch = int(image_processor.patch_size)
        self.merge = int(image_processor.merge_size)
        self.temporal = int(image_processor.temporal_patch_size)
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = int(processor.tokenizer.convert_tokens_to_ids(self.image_token))
        self.table = self._lookup_table().to(device)
        self.checked: dict[tuple[int, int], bool] = {}
        self.disabled = ""

    def _lookup_table(self) -> torch.Tensor:
        """(3, 256) float32: the processor's value for each channel and uint8 level."""
        ip = self.processor.image_processor
        levels = np.tile(np.arange(256, dtype=np.uint8)[None, None, :], (3, 1, 1))  # channels first
        try:  # the PIL backend works on numpy arrays
            image = self._processed(ip, levels)
        except TypeError:  # the torchvision backend (where torchvision is installed) takes tensors
            image = self._processed(ip, torch.from_numpy(levels).float())
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        return torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(3, 256).copy())

    @staticmethod
    def _processed(ip, image):
        """The processor's own rescale and normalize, so the table follows its settings."""
        if getattr(ip, "do_rescale", True):
            image = ip.rescale(image, ip.rescale_factor)
        if getattr(ip, "do_normalize", True):
            image = ip.normalize(image, ip.image_mean, ip.image_std)
        return image

    def _limits(self) -> tuple[int, int]:
        size = self.processor.image_processor.size
        get = size.get if isinstance(size, Mapping) else (lambda k, d=None: getattr(size, k, d))
        return int(get("shortest_edge", 0) or 0), int(get("longest_edge", 0) or 0)

    def keeps_size(self, height: int, width: int) -> bool:
        """Whether the processor would pass a frame of this size through unresized."""
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        except ImportError:  # the torchvision-free module is missing: the other one needs torchvision
            try:
                from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
            except ImportError:
                return False
        min_pixels, max_pixels = self._limits()
        if not max_pixels:
            return False
        factor = self.patch * self.merge
        try:
            return smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                                max_pixels=max_pixels) == (height, width)
        except ValueError:
            return False

    def pixel_values(self, rgb: np.ndarray) -> torch.Tensor:
        """(gh*gw, 3*T*p*p) float32 on the device, in the processor's block-major patch order."""
        height, width = rgb.shape[:2]
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = height // p, width // p
        frame = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True)
        levels = frame.permute(2, 0, 1).reshape(3, -1).long()
        values = torch.gather(self.table, 1, levels).view(3, gh // m, m, p, gw // m, m, p)
        patches = values.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)
        return patches.reshape(gh * gw, 3 * t * p * p)

    def _text(self, prompt_text: str, tokens: int) -> dict[str, torch.Tensor]:
        if prompt_text.count(self.image_token) != 1:
            raise ValueError("one image placeholder expected")
        expanded = prompt_text.replace(self.image_token, self.image_token * tokens)
        encoded = self.processor.tokenizer([expanded], return_tensors="pt")
        ids = encoded["input_ids"]
        mask = encoded.get("attention_mask")
        return {"input_ids": ids, "attention_mask": mask if mask is not None else torch.ones_like(ids),
                "mm_token_type_ids": (ids == self.image_token_id).to(torch.long)}

    def __call__(self, rgb: np.ndarray, prompt_text: str) -> dict[str, torch.Tensor] | None:
        """The processor's outputs (tensors on the device, pixel values in the model dtype) or None."""
        if self.disabled:
            return None
        height, width = rgb.shape[:2]
        if not self.keeps_size(height, width) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            return None
        gh, gw = height // self.patch, width // self.patch
        text = self._text(prompt_text, gh * gw // (self.merge * self.merge))
        pixels = self.pixel_values(rgb)
        out = {**text, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, gh, gw]], dtype=torch.long)}
        if not self.checked.get((height, width)):
            if not self._matches_processor(rgb, prompt_text, out):
                return None
            self.checked[(height, width)] = True
        inputs = {k: v.to(self.device) for k, v in out.items()}
        inputs["pixel_values"] = pixels.to(self.dtype)
        return inputs

    def _matches_processor(self, rgb: np.ndarray, prompt_text: str, ours: dict[str, torch.Tensor]) -> bool:
        from PIL import Image

        reference = self.processor(text=[prompt_text], images=[Image.fromarray(rgb)], return_tensors="pt")
        reference = {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}
        problems = [k for k in reference if k not in ours]
        for key, value in ours.items():
            ref = reference.get(key)
            if ref is None or tuple(ref.shape) != tuple(value.shape) or not torch.equal(
                    ref.to(value.device, value.dtype), value):
                problems.append(key)
        if problems:
            self.disabled = f"GPU preprocessing differs from the processor in {sorted(set(problems))}"
            log.warning(f"{self.disabled}; using the processor")
            return False
        return True
