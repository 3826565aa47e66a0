"""Capturing a function as a CUDA graph: the one recipe the fast generator and the graphed decoder share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Eager runs before capture: the first allocates workspaces (cuBLAS, autotuning) outside the graph.
WARMUP_RUNS = 2


def capture_graph(fn: Callable[[], Any], device: torch.device, pool: Any = None,
                  capture_error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warms ``fn`` up on a side stream, then captures it; returns the graph and its outputs.

    The warm-up runs on a side stream because capture must not see allocations and lazy
    initialisation that happen on a first call; ``pool`` shares a memory pool between graphs.
    All of it runs with ``device`` current: ``torch.cuda.graph`` takes its capture stream on the
    current device, which for ``cuda:1`` need not be the tensors' device.
    """
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=capture_error_mode):
            out = fn()
    return graph, out
