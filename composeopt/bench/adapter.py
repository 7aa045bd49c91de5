"""The torch adapter's row: `composeopt.torch.Optimizer(Adam)` against `torch.optim.Adam(fused=True)`
on the same `nn.Module`, timed alternately (`time_beside`), gradients already in `.grad`."""

from __future__ import annotations

import importlib.util
from typing import Any

from .sets import B1, B2, EPS, LR
from .timing import time_beside

__all__ = ["available", "adapter_report", "adapter_line"]

WIDTHS = (1024, 2048, 2048, 1024, 10)
"""An MLP of 4 linear layers, about 8.4M parameters: big enough that the step, not Python, counts."""


def available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _module(torch: Any, scale: float) -> Any:
    widths = [max(int(width * scale**0.5), 2) for width in WIDTHS]
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = torch.nn.Sequential(*layers)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    return model


def adapter_report(scale: float, reps: int) -> dict[str, Any]:
    """ms per step of the adapter and of torch's fused Adam, each on its own copy of the module."""
    import torch

    from .. import Adam
    from ..torch import Optimizer

    torch.manual_seed(0)
    ours_model, theirs_model = _module(torch, scale), _module(torch, scale)
    ours = Optimizer(ours_model.named_parameters(), Adam(LR, (B1, B2), EPS))
    theirs = torch.optim.Adam(theirs_model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, fused=True)
    ours_seconds, theirs_seconds = time_beside(ours.step, theirs.step, reps, wait=(True, True))
    return {
        "parameters": sum(p.numel() for p in ours_model.parameters()),
        "tensors": len(list(ours_model.parameters())),
        "composeopt_ms": 1e3 * ours_seconds,
        "torch_fused_ms": 1e3 * theirs_seconds,
        "ratio": ours_seconds / theirs_seconds,
    }


def adapter_line(row: dict[str, Any]) -> str:
    return (
        f"composeopt.torch.Optimizer(Adam) on an nn.Module ({row['tensors']} tensors, "
        f"{row['parameters']:,} parameters): {row['composeopt_ms']:.2f} ms per step, "
        f"torch.optim.Adam(fused=True) {row['torch_fused_ms']:.2f} ms: {row['ratio']:.2f}x"
    )
