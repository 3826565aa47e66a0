"""Spatial-semantic object queries: box Fourier encoding + LLM hidden state, refined over memory.

The LLM hidden state of an object's mask token says *what* the object is (the model wrote its
label and box just before); the box says *where*, more precisely than text can carry through the
hidden state. The query is the sum of both projections and a learned embedding, then a few
transformer layers let queries of one frame see each other (two mugs side by side) and attend to
the memory map, with an attention bias that favours the object's box.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig

#: Smallest box side (fraction of the image) the log-size encoding distinguishes.
MIN_BOX_SIDE = 1e-3


def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` normalised xyxy boxes -> ``(N, 4)`` (x1, y1, log-scaled w, log-scaled h) in 0..1.

    Log scaling gives small objects as much resolution as large ones.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    w = (x2 - x1).clamp(min=MIN_BOX_SIDE)
    h = (y2 - y1).clamp(min=MIN_BOX_SIDE)
    scale = -math.log(MIN_BOX_SIDE)
    return torch.stack([x1, y1, 1 + torch.log(w) / scale, 1 + torch.log(h) / scale], dim=-1)


class BoxFourierEncoding(nn.Module):
    """Sine/cosine features of the box at octave frequencies, then a two-layer MLP."""

    def __init__(self, num_freqs: int, dim: int) -> None:
        super().__init__()
        # the frequencies are made in fp32 at each call: a buffer cast with a bf16 decoder was
        # rounded (26 rad off at 2^15 pi, for the base decoder's 16 frequencies)
        self.num_freqs = num_freqs
        in_dim = 4 + 4 * 2 * num_freqs
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        feats = box_features(boxes.float())
        freqs = math.pi * (2.0 ** torch.arange(self.num_freqs, dtype=torch.float32, device=feats.device))
        angles = feats[..., None] * freqs  # (N, 4, F)
        encoded = torch.cat([feats, angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)
        return self.mlp(encoded.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention with an additive bias, on ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projects a source once; callers gather it per object instead of projecting copies."""
        k, v = self.kv(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q = self._heads(self.q(x))
        if bias is not None and bias.dtype != torch.bool:  # bool masks select, float ones add
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        b, h, n, dh = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, h * dh))


class QueryLayer(nn.Module):
    """Pre-norm transformer layer: queries of a frame attend to each other, then to the memory."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.bias_scale = nn.Parameter(torch.ones(()))  # how strongly the box/mask prior steers

    def forward(
        self,
        queries: torch.Tensor,  # (N, D)
        memory: torch.Tensor,  # (B, L, D)
        batch_index: torch.Tensor,  # (N,) frame of each query
        prior: torch.Tensor,  # (N, L) log-prior over memory positions (0 = neutral)
        valid: torch.Tensor | None = None,  # (N,) bool; padding queries are not attended to
    ) -> torch.Tensor:
        x = self.self_norm(queries)[None]  # one sequence of all queries, masked per frame
        visible = batch_index[:, None] == batch_index[None, :]
        if valid is not None:
            visible = visible & (valid[None, :] | torch.eye(len(valid), dtype=torch.bool, device=valid.device))
        k, v = self.self_attn.keys_values(x)
        queries = queries + self.self_attn(x, k, v, visible[None, None])[0]
        queries = queries + self._attend_memory(self.cross_norm(queries), memory, batch_index, prior)
        return queries + self.mlp(self.mlp_norm(queries))

    def _attend_memory(self, x: torch.Tensor, memory: torch.Tensor, batch_index: torch.Tensor,
                       prior: torch.Tensor) -> torch.Tensor:
        k, v = self.cross_attn.keys_values(memory)
        bias = self.bias_scale * prior
        if memory.shape[0] == 1:  # one frame (inference): all queries as one sequence, no copies
            return self.cross_attn(x[None], k, v, bias[None, None])[0]
        # several frames: each query attends to its own frame's memory
        return self.cross_attn(x[:, None], k[batch_index], v[batch_index], bias[:, None, None, :])[:, 0]


class QueryEncoder(nn.Module):
    """LLM hidden state + box -> one query per object, refined by :class:`QueryLayer` s."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        dim = config.dim
        self.llm_projection = nn.Sequential(
            nn.LayerNorm(config.llm_dim),
            nn.Linear(config.llm_dim, config.llm_hidden_dim),
            nn.GELU(),
            nn.Linear(config.llm_hidden_dim, dim),
        )
        self.box_encoding = BoxFourierEncoding(config.fourier_freqs, dim)
        self.embedding = nn.Parameter(torch.zeros(dim))
        self.layers = nn.ModuleList(
            QueryLayer(dim, config.num_heads, config.mlp_dim) for _ in range(config.num_query_layers)
        )

    def forward(
        self,
        llm_states: torch.Tensor,  # (N, llm_dim)
        boxes: torch.Tensor,  # (N, 4) normalised xyxy
        memory: torch.Tensor,  # (B, L, D)
        batch_index: torch.Tensor,  # (N,)
        box_prior: torch.Tensor,  # (N, L)
        valid: torch.Tensor | None = None,  # (N,) bool, False for padding
    ) -> torch.Tensor:
        dtype = self.embedding.dtype
        queries = self.llm_projection(llm_states.to(dtype)) + self.box_encoding(boxes) + self.embedding
        for layer in self.layers:
            queries = layer(queries, memory, batch_index, box_prior, valid)
        return queries
