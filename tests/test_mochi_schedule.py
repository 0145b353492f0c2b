"""Mochi's linear-quadratic sigma schedule (`mlx_video.samplers.schedules`) and the timesteps the Mochi pipeline
gives its transformer, against diffusers' MochiPipeline and its inverted scheduler, step for step."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pipeline_mochi = pytest.importorskip("diffusers.pipelines.mochi.pipeline_mochi")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from mlx_video.families.mochi.pipeline import mochi_timesteps  # noqa: E402
from mlx_video.samplers import make_sampler  # noqa: E402
from mlx_video.samplers.schedules import linear_quadratic_sigmas  # noqa: E402


@pytest.mark.parametrize(
    "steps,threshold,linear",
    [(64, 0.025, None), (2, 0.025, None), (7, 0.025, None), (50, 0.025, None), (31, 0.1, None), (64, 0.025, 10), (9, 0.05, 8)],
)
def test_matches_diffusers(steps, threshold, linear):
    ours = linear_quadratic_sigmas(steps, threshold, linear)
    ref = np.array(pipeline_mochi.linear_quadratic_schedule(steps, threshold, linear))
    assert ours.shape == ref.shape == (steps,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_published_values():
    s = linear_quadratic_sigmas(64)
    assert s[0] == 1.0
    assert s[32] == pytest.approx(0.975, abs=1e-12)  # the linear part ends at 1 - threshold
    assert np.all(np.diff(s) < 0) and s[-1] > 0


@pytest.mark.parametrize("steps", [64, 13])
def test_timesteps_and_steps_match_the_pipeline_scheduler(steps):
    sampler = make_sampler("euler", steps, 1.0, schedule="linear-quadratic")
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    scheduler.set_timesteps(sigmas=linear_quadratic_sigmas(steps))
    np.testing.assert_array_equal(mochi_timesteps(sampler.sigmas[:steps]), scheduler.timesteps.numpy())
    # The scheduler works on 1 - sigma and ends at 1 (sigma 0); its steps are ours with the sign of the
    # prediction flipped (Mochi predicts x0 - noise, the Euler rule takes noise - x0).
    ref = scheduler.sigmas.numpy()
    assert ref[-1] == 1.0 and sampler.sigmas[-1] == 0.0
    np.testing.assert_allclose(1 - ref, sampler.sigmas, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.diff(ref), -np.diff(sampler.sigmas), rtol=0, atol=2e-7)


def test_bad_arguments():
    with pytest.raises(ValueError):
        linear_quadratic_sigmas(0)
    with pytest.raises(ValueError):
        linear_quadratic_sigmas(8, linear_steps=8)
    with pytest.raises(ValueError, match="no shift"):
        make_sampler("euler", 8, 3.0, schedule="linear-quadratic")
