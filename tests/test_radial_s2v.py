"""Radial attention in the Wan2.2-S2V transformer: the video tokens take the reference's mask and the reference
and motion tokens after them are kept whole, like text. Checked on the tiny S2V model of tests/support/wan_s2v.py
(official weights, 3 latent frames of 4x8 tokens, 8-token tiles) against the same forward whose self-attention
is dense attention under the token mask of the transcribed reference (tests/support/reference/radial_mask.py)."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_video.nn.radial import RadialDefaults
from mlx_video.pipelines.attention_mode import AttentionMode, RadialRun, prepare_model
from support.reference.radial_mask import gen_log_mask_shrinked
from support.arrays import rel_err_f64
from support.wan_s2v import Fixture, ours_layout, run

TILE = 8


class ReferenceMaskedAttention:
    """A self-attention site: dense attention with every score outside the reference's kept tiles removed."""

    def __init__(self, frames: int, per_frame: int, decay: float):
        self.frames, self.per_frame, self.decay = frames, per_frame, decay

    def __call__(self, q, k, v, scale, mask):
        tokens, video = k.shape[1], self.frames * self.per_frame
        with torch.no_grad():
            tiles = gen_log_mask_shrinked(tokens, video, self.frames, block_size=TILE, sparse_type="radial",
                                          decay_factor=self.decay, model_type="wan").numpy()
        keep = np.ones((tokens, tokens), dtype=bool)
        n = tiles.shape[0] * TILE
        keep[:n, :n] = np.repeat(np.repeat(tiles, TILE, axis=0), TILE, axis=1)
        t = [a.transpose(0, 2, 1, 3) for a in (q, k, v)]
        out = mx.fast.scaled_dot_product_attention(*t, scale=scale, mask=mx.array(keep[: q.shape[1]]))
        return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def test_s2v_radial_equals_dense_attention_under_the_reference_mask():
    fx = Fixture("a")
    model = fx.model()
    args = ours_layout(fx.inputs("full"))
    _, frames, height, width, _ = args["x"].shape
    per_frame = (height // 2) * (width // 2)
    assert frames * per_frame % TILE == 0  # where the reference is defined
    defaults = RadialDefaults(block=TILE, decay=0.8, dense_steps=0, dense_blocks=0, first_frame_dense=True,
                              source="test")
    prepare_model(model, None)
    dense = run(model, args, False)
    radial = RadialRun(defaults, AttentionMode("radial", 0, 1), frames, per_frame)
    prepare_model(model, radial)
    ours = run(model, args, False)
    assert radial.plan_now(1, frames * per_frame) is not None and radial.plan_now(0, 10**4) is None  # block 0 dense
    for index, site in enumerate(model.attention_sites()):
        site.sparse = None if index < 1 else ReferenceMaskedAttention(frames, per_frame, defaults.decay)
    reference = run(model, args, False)
    prepare_model(model, None)
    err = rel_err_f64(ours, reference)
    print(f"S2V radial vs dense under the reference mask: {err:.2e} (radial vs dense {rel_err_f64(ours, dense):.2e})")
    assert err < 1e-5
    assert rel_err_f64(ours, dense) > 1e-3
    tokens = radial.sequence_lengths[-1]
    assert tokens > frames * per_frame  # the reference and motion tokens after the video, kept whole
    assert radial.plan(tokens).mask[frames * per_frame // TILE:].all()


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
