"""How the parity tests measure and move arrays: relative errors, torch's channels-first video tensors to and from
our channels-last layout, the shapes of a module's state dict."""

from __future__ import annotations

import numpy as np


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, computed in the arrays' own precision."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rel_err_f64(ours, ref) -> float:
    """||ours - ref|| / ||ref||, both taken to float64 first."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def to_torch(x: np.ndarray):
    """(B, T, H, W, C) numpy -> (B, C, T, H, W) torch."""
    import torch

    return torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()


def from_torch(x) -> np.ndarray:
    """(B, C, T, H, W) torch -> (B, T, H, W, C) numpy."""
    return x.permute(0, 2, 3, 4, 1).numpy()


def meta_shapes(module) -> dict:
    """A torch module's parameter and buffer names -> shapes (the module may live on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
