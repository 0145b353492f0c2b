"""`--attention dense|radial[:DENSE_STEPS[:DENSE_BLOCKS]]`: which self-attention a run uses.

dense    every score (the default).
radial   Radial Attention (`mlx_video.nn.radial`): a static block-sparse mask of the video tokens. The first
         DENSE_STEPS denoising steps, counted over the whole run (across experts), and the first
         DENSE_BLOCKS blocks of each transformer (each expert counts its own) stay dense, as the reference
         repository's scripts do; left out, both take the family's defaults (its `RadialDefaults`).

A family's transformer lists its self-attention sites in block order (`attention_sites()`: objects the block
passes as `sparse=` to `mlx_video.nn.attention.attention`); `RadialRun.attach(model)` gives each site its
block index. The family's pipeline tells the run the video's token layout and, before each step, the step
index (`begin_step`). Nothing here names a family.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MlxVideoError
from ..kernels import warm_up_block_sparse_attention
from ..nn.attention import blocked_score_bytes
from ..nn.radial import RadialDefaults, RadialPlan, radial_attention, radial_attention_bytes, radial_block_mask

MODES = ("dense", "radial")


@dataclass(frozen=True)
class AttentionMode:
    name: str  # dense | radial
    dense_steps: int | None = None  # None: the family's default
    dense_blocks: int | None = None


def parse_attention(text: str | None) -> AttentionMode:
    """`dense`, `radial`, `radial:DENSE_STEPS` or `radial:DENSE_STEPS:DENSE_BLOCKS` (None: dense)."""
    if text is None:
        return AttentionMode("dense")
    name, *numbers = str(text).split(":")
    if name not in MODES:
        raise MlxVideoError(f"--attention: unknown mode {name!r}; choose dense or radial[:DENSE_STEPS[:DENSE_BLOCKS]]")
    if name == "dense" and numbers or len(numbers) > 2:
        raise MlxVideoError(f"--attention {text!r}: expected dense or radial[:DENSE_STEPS[:DENSE_BLOCKS]]")
    values = []
    for label, value in zip(("DENSE_STEPS", "DENSE_BLOCKS"), numbers):
        if not value.isdigit():
            raise MlxVideoError(f"--attention {text!r}: {label} must be a whole number >= 0, not {value!r}")
        values.append(int(value))
    return AttentionMode(name, *values)


def check_attention(text: str | None, defaults: RadialDefaults | None, model_id: str) -> None:
    """Refuse a mode the model cannot run, before any weights are read."""
    mode = parse_attention(text)
    if mode.name == "radial" and defaults is None:
        raise MlxVideoError(f"--attention radial: {model_id} has no radial attention parameters; use dense")


class RadialSite:
    """One self-attention site of a transformer under a radial run: the block-sparse attention when the run's
    step and this site's block are past the dense ones, else None (the caller attends densely)."""

    def __init__(self, run: "RadialRun", index: int):
        self.run, self.index = run, index

    def __call__(self, q, k, v, scale, mask):
        plan = self.run.plan_now(self.index, k.shape[1])
        if plan is None:
            return None
        variant = (q.dtype, q.shape[-1])
        if variant not in self.run.warmed:  # the GPU kernel's probe, once per dtype and head width (a no-op on CPU)
            self.run.warmed.add(variant)
            warm_up_block_sparse_attention(*variant)
        return radial_attention(q, k, v, plan, scale=scale, mask=mask)


class RadialRun:
    """A run's radial attention: its settings, the current step and the plans per sequence length (the video's
    layout is fixed; anything after the video, text or extra frames, is kept whole and may vary)."""

    def __init__(self, defaults: RadialDefaults, mode: AttentionMode, frames: int, tokens_per_frame: int):
        self.defaults = defaults
        self.dense_steps = defaults.dense_steps if mode.dense_steps is None else mode.dense_steps
        self.dense_blocks = defaults.dense_blocks if mode.dense_blocks is None else mode.dense_blocks
        self.frames, self.tokens_per_frame = frames, tokens_per_frame
        self.step = 0
        self._plans: dict[int, RadialPlan] = {}
        self.warmed: set = set()

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def sequence_lengths(self) -> list[int]:
        """The sequence lengths (video and what follows it) planned so far."""
        return sorted(self._plans)

    def begin_step(self, i: int) -> None:
        self.step = i

    def plan(self, tokens: int) -> RadialPlan:
        if tokens < self.video_tokens:
            raise ValueError(f"radial attention over {tokens} tokens, fewer than the video's {self.video_tokens}")
        if tokens not in self._plans:
            d = self.defaults
            mask = radial_block_mask(self.frames, self.tokens_per_frame, block=d.block, decay=d.decay,
                                     text_tokens=tokens - self.video_tokens, first_frame_dense=d.first_frame_dense)
            self._plans[tokens] = RadialPlan.of(mask, d.block, tokens)
        return self._plans[tokens]

    def plan_now(self, block_index: int, tokens: int) -> RadialPlan | None:
        if self.step < self.dense_steps or block_index < self.dense_blocks:
            return None
        if tokens < self.video_tokens:  # not this run's video (a kernel warm-up's minimal input): dense
            return None
        return self.plan(tokens)

    def attention_bytes(self, batch: int, heads: int, q_len: int, k_len: int, head_dim: int, itemsize: int,
                        budget: int) -> int:
        """Bytes alive at once in this run's self-attention over `k_len` tokens where attention is not fused (what
        `mlx_video.nn.attention.blocked_score_bytes(sparse=run)` answers for the memory preflight): the sparse
        calls' (`radial_attention_bytes`), and where any step or block stays dense, the bounded dense scores too."""
        if k_len < self.video_tokens:  # not the whole video (a rank's share): dense, as `plan_now` attends
            return blocked_score_bytes(batch, heads, q_len, k_len, budget)
        sparse = radial_attention_bytes(self.plan(k_len), batch, heads, q_len, head_dim, itemsize, budget)
        if self.dense_steps == 0 and self.dense_blocks == 0:
            return sparse
        return max(sparse, blocked_score_bytes(batch, heads, q_len, k_len, budget))

    def attach(self, model) -> None:
        for index, site in enumerate(model.attention_sites()):
            site.sparse = RadialSite(self, index)

    def wrap(self, predict):
        """`predict(latents, i, t)` that first tells the run which step it is."""
        def predict_at_step(latents, i, t):
            self.begin_step(i)
            return predict(latents, i, t)
        return predict_at_step

    def stats(self) -> dict:
        fractions = sorted({round(p.score_fraction(), 6) for p in self._plans.values()})
        return {
            "attention": f"radial:{self.dense_steps}:{self.dense_blocks}",
            "attention_dense_steps": self.dense_steps,
            "attention_dense_blocks": self.dense_blocks,
            "attention_block": self.defaults.block,
            "attention_decay": self.defaults.decay,
            # the share of the score matrix a sparse block computes (one value per sequence length seen)
            "attention_score_fraction": fractions[0] if len(fractions) == 1 else fractions,
        }


def detach(model) -> None:
    """Dense attention at every site of `model`."""
    for site in model.attention_sites():
        site.sparse = None


def make_radial_run(text: str | None, defaults: RadialDefaults | None, frames: int,
                    tokens_per_frame: int) -> RadialRun | None:
    """The run's radial attention for `--attention text`, or None for dense."""
    mode = parse_attention(text)
    if mode.name == "dense":
        return None
    if defaults is None:
        raise MlxVideoError("--attention radial: this model has no radial attention parameters; use dense")
    return RadialRun(defaults, mode, int(frames), int(tokens_per_frame))


def prepare_model(model, run: RadialRun | None) -> None:
    """Attach `run` to every self-attention site of `model` (dense sites when run is None)."""
    if run is None:
        detach(model)
    else:
        run.attach(model)

