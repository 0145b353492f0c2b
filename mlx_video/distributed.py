"""Several processes (or Macs) as one generation, on `mx.distributed`.

Launched with MLX's own launcher, e.g. two processes on one machine or one per Mac:

    mlx.launch -n 2 --backend ring -- mlxvid generate ...
    mlx.launch --hosts mac1,mac2 --backend ring -- mlxvid generate ...

the group is split by a fixed rule (`plan_split`):
  * CFG-parallel: with classifier-free guidance and an even group, half the ranks run the conditional pass and
    half the unconditional one; the guided velocity is combined after one all_gather of the outputs per step.
  * batch-parallel: `mlxvid batch` on a group deals the manifest's jobs to the ranks (job k to rank k mod N,
    in the batch's model order); each rank runs and writes its jobs alone; rank 0 writes the summary.
  * sequence-parallel (the remaining factor, 1 to N ranks per pass): the video tokens are split into
    contiguous blocks, one per rank; every layer but self-attention works on the rank's own tokens, and
    self-attention gathers every rank's keys and values (an all_gather of K and V per block; each rank's
    queries then see all keys). This is the "all-gather K/V" form of ring attention: one collective per layer
    instead of a ring of send/recv steps, the simplest exact exchange MLX's primitives give; its cost is the
    memory of the whole K and V on every rank (activations of the rest stay 1/N).
Every rank holds the transformer; the text encoder runs on every rank (each needs the embeddings), the VAE
only on rank 0, which alone writes the output and the sidecar. A single process runs unchanged.

MLX's ring back-end cannot split a group into sub-groups, so collectives run over the whole group and each
rank keeps the blocks of its own sub-group (with CFG-parallel this moves twice the necessary K/V bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from .errors import MlxVideoError


@lru_cache(maxsize=1)
def world():
    """The process group (size 1 when not launched by mlx.launch)."""
    return mx.distributed.init()


_SOLO = [False]


def world_size() -> int:
    """The size of the group a generation runs on: 1 inside `solo()` (batch-parallel jobs)."""
    return 1 if _SOLO[0] else world().size()


def rank() -> int:
    """This process's rank for a generation: 0 inside `solo()`, where every rank runs and writes its own jobs."""
    return 0 if _SOLO[0] else world().rank()


class solo:
    """Within this context each process runs whole generations alone (batch-parallel: jobs dealt to ranks)."""

    def __enter__(self):
        self._previous = _SOLO[0]
        _SOLO[0] = True
        return self

    def __exit__(self, *exc):
        _SOLO[0] = self._previous


def backend_name() -> str:
    return os.environ.get("MLX_BACKEND") or ("ring" if os.environ.get("MLX_HOSTFILE") else "none")


def plan_split(size: int, uses_cfg: bool) -> tuple[int, int]:
    """(ranks per CFG half, ...) as (cfg_ranks, seq_ranks): CFG-parallel when guidance is on and the group is
    even, the rest sequence-parallel."""
    if size < 1:
        raise MlxVideoError(f"group size {size} is not a positive number")
    if uses_cfg and size % 2 == 0:
        return 2, size // 2
    return 1, size


@dataclass
class Split:
    size: int
    rank: int
    cfg_ranks: int
    seq_ranks: int

    @property
    def cfg_index(self) -> int:
        return self.rank // self.seq_ranks

    @property
    def seq_index(self) -> int:
        return self.rank % self.seq_ranks

    def describe(self) -> dict:
        return {"ranks": self.size, "backend": backend_name(), "cfg_parallel": self.cfg_ranks,
                "sequence_parallel": self.seq_ranks}

    # ---- collectives (over the whole group; see the module docstring) ----

    def _gather_blocks(self, x: mx.array, axis: int, first: int, count: int) -> mx.array:
        """Concatenate along `axis` the tensors of ranks first .. first+count-1 (every rank calls this)."""
        moved = mx.moveaxis(x, axis, 0)
        n = moved.shape[0]
        gathered = mx.distributed.all_gather(moved, group=world())
        block = gathered[first * n:(first + count) * n]
        return mx.moveaxis(block, 0, axis)

    def gather_sequence(self, x: mx.array, axis: int) -> mx.array:
        """The whole token axis from this rank's sequence group (its blocks in rank order)."""
        if self.seq_ranks == 1:
            return x
        return self._gather_blocks(x, axis, self.cfg_index * self.seq_ranks, self.seq_ranks)

    def token_slice(self, n_tokens: int, what: str = "tokens") -> slice:
        if n_tokens % self.seq_ranks:
            raise MlxVideoError(
                f"{n_tokens} {what} cannot be split evenly over {self.seq_ranks} sequence-parallel ranks; use a group "
                f"size that divides it (or a size/frame count whose token count the group divides)"
            )
        n = n_tokens // self.seq_ranks
        return slice(self.seq_index * n, (self.seq_index + 1) * n)

    def gather_scalar(self, value: float) -> list[float]:
        """One number from every rank, in rank order (e.g. per-rank timings for the sidecar)."""
        return mx.distributed.all_gather(mx.array([float(value)]), group=world()).tolist()

    def gather_cfg(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(conditional output, unconditional output): from the first rank of each CFG half."""
        gathered = mx.distributed.all_gather(x, group=world())
        n = x.shape[0]
        return gathered[:n], gathered[self.seq_ranks * n:(self.seq_ranks + 1) * n]


def current_split(uses_cfg: bool) -> Split | None:
    """The split of this run, or None in a single process."""
    size = world_size()
    if size == 1:
        return None
    cfg_ranks, seq_ranks = plan_split(size, uses_cfg)
    return Split(size, rank(), cfg_ranks, seq_ranks)


def guidance_cfg_parallel(split: Split):
    """A guidance strategy (see pipelines/loop.py) running the two passes on the two halves of the group."""

    def guide(forward, x, t, cond, uncond, scale: float) -> mx.array:
        if uncond is None or scale == 1.0:
            return forward(x, t, cond)
        out = forward(x, t, cond if split.cfg_index == 0 else uncond)
        c, u = split.gather_cfg(out)
        return u + scale * (c - u)

    return guide


def folder_fingerprint(path) -> str:
    """A cheap content fingerprint of a model folder: its manifest and every file's name and size."""
    from pathlib import Path

    root = Path(path)
    h = hashlib.sha256()
    h.update((root / "mlxvid.json").read_bytes())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    return h.hexdigest()


def check_same_model(path) -> None:
    """Every rank must hold the same model folder; refuse with the ranks that differ."""
    if world_size() == 1:
        return
    digest = folder_fingerprint(path)
    mine = mx.array(list(bytes.fromhex(digest)), dtype=mx.uint8)
    everyone = mx.distributed.all_gather(mine[None], group=world())
    digests = [bytes(list(map(int, row))).hex() for row in everyone.tolist()]
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d[:12], []).append(r)
        raise MlxVideoError(
            f"the ranks hold different model folders (fingerprints by rank: {json.dumps(groups)}); copy the same "
            "converted folder to every machine"
        )
