"""A PyTorch model trained by composeopt: autograd from torch, the update from composeopt.

The parameters are updated in place through zero-copy views: NumPy views of
CPU tensors (`tensor.numpy()`), CuPy views of CUDA tensors (DLPack).  The
views are made once, so the optimiser sees the same arrays every step.

    python docs/examples/torch_mlp.py
    python docs/examples/torch_mlp.py --device cuda   # needs CuPy
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from numpy_mlp import two_spirals

import composeopt as co


def as_array(tensor: torch.Tensor) -> Any:
    """An array that shares `tensor`'s memory: NumPy on the CPU, CuPy on a GPU."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.numpy()
    import cupy  # only needed for CUDA tensors

    return cupy.from_dlpack(tensor)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )


def train(
    model: torch.nn.Module, opt: co.Rule, steps: int = 1500, device: str = "cpu", seed: int = 0
) -> list[float]:
    """Train `model` on the spirals with `opt`; returns the loss at every step."""
    points, labels = two_spirals(seed=seed)
    X = torch.tensor(points, dtype=torch.float32, device=device)
    y = torch.tensor(labels, dtype=torch.float32, device=device)
    model.to(device)
    params = {name: as_array(p) for name, p in model.named_parameters()}  # views, made once
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(steps):
        model.zero_grad()
        loss = loss_fn(model(X)[:, 0], y)
        loss.backward()
        grads = {name: as_array(p.grad) for name, p in model.named_parameters()}
        co.update_(opt, params, grads)  # writes into the model's tensors
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    opt = co.Optimiser(co.ClipGlobalNorm(5.0), co.Adam(0.01))
    losses = train(make_model(), opt, args.steps, args.device)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
