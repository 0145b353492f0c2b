"""Samplers against diffusers' schedulers, and the Wan 2.2 A14B expert split.

UniPC is compared with `UniPCMultistepScheduler` configured as Wan's FlowUniPCMultistepScheduler;
Euler with `FlowMatchEulerDiscreteScheduler`. Both diffusers schedulers apply their own shift to the
sigmas they are given, so each receives our grid *before* the shift and the same shift value:
that is how the Wan code (shift inside set_timesteps) and HunyuanVideo (shift of linspace(1, 0)) run.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from mlx_video.samplers import SAMPLERS, make_sampler
from mlx_video.samplers.flow import flow_euler_sigmas, shift_sigmas, unipc_flow_sigmas

SCHEDULES = [(40, 12.0), (40, 5.0), (50, 5.0), (4, 3.0), (2, 1.0), (1, 1.0)]
LATENT_SHAPE = (1, 16, 2, 4, 32)


def reference_scheduler(kind, steps, shift):
    if kind == "unipc":
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            solver_type="bh2",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(sigmas=unipc_flow_sigmas(steps))
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        scheduler.set_timesteps(sigmas=flow_euler_sigmas(steps))
    # Step by index rather than by looking the timestep up, which duplicates would confuse.
    scheduler.set_begin_index(0)
    return scheduler


class FakeFlowModel:
    """v = (x − x0(x, σ)) / σ, x0 a fixed nonlinear function of x: the multistep history matters."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        width = LATENT_SHAPE[-1]
        self.projection = rng.standard_normal((width, width)) / np.sqrt(width)

    def __call__(self, x, sigma):
        x = np.asarray(x, dtype=np.float64)
        x0 = 0.8 * np.tanh(x @ self.projection) + 0.1 * np.sin(3.0 * sigma)
        return ((x - x0) / sigma).astype(np.float32)


def worst_trajectory_error(kind, steps, shift):
    """Largest per-step max|ours − reference| / max|reference| along a whole fp32 trajectory."""
    ours = make_sampler(kind, steps=steps, shift=shift)
    ours.reset()
    reference = reference_scheduler(kind, steps, shift)
    model = FakeFlowModel()
    noise = np.random.default_rng(1).standard_normal(LATENT_SHAPE).astype(np.float32)

    x_ours, x_ref = mx.array(noise), torch.from_numpy(noise.copy())
    worst = 0.0
    for i in range(steps):
        sigma = float(ours.sigmas[i])
        x_ours = ours.step(mx.array(model(np.array(x_ours), sigma)), i, x_ours)
        v_ref = torch.from_numpy(model(x_ref.numpy(), sigma))
        x_ref = reference.step(v_ref, reference.timesteps[i], x_ref).prev_sample

        assert x_ours.dtype == mx.float32 and x_ours.shape == LATENT_SHAPE
        got, want = np.array(x_ours).astype(np.float64), x_ref.numpy().astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


@pytest.mark.parametrize("steps,shift", SCHEDULES)
def test_unipc_schedule_matches_reference(steps, shift):
    sampler = make_sampler("unipc", steps=steps, shift=shift)
    reference = reference_scheduler("unipc", steps, shift)

    assert sampler.sigmas.dtype == np.float32 and sampler.sigmas.shape == (steps + 1,)
    assert sampler.sigmas[-1] == 0.0
    np.testing.assert_array_equal(sampler.sigmas, reference.sigmas.numpy())
    assert sampler.timesteps.dtype == np.int64 and sampler.timesteps.shape == (steps,)
    np.testing.assert_array_equal(sampler.timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize("steps,shift", SCHEDULES)
def test_euler_schedule_matches_reference(steps, shift):
    sampler = make_sampler("euler", steps=steps, shift=shift)
    reference = reference_scheduler("euler", steps, shift)

    assert sampler.sigmas.dtype == np.float32 and sampler.sigmas.shape == (steps + 1,)
    assert sampler.sigmas[0] == 1.0 and sampler.sigmas[-1] == 0.0
    np.testing.assert_array_equal(sampler.sigmas, reference.sigmas.numpy())
    assert sampler.timesteps.dtype == np.float32 and sampler.timesteps.shape == (steps,)
    np.testing.assert_array_equal(sampler.timesteps, reference.timesteps.numpy())


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize("steps,shift", SCHEDULES)
def test_trajectory_matches_reference(kind, steps, shift):
    # Measured: UniPC at most ~1e-6 (float64 host coefficients against the reference's float32 ones),
    # Euler bit-identical.
    assert worst_trajectory_error(kind, steps, shift) < 3e-6


def test_unipc_history_is_reset_between_runs():
    sampler = make_sampler("unipc", steps=4, shift=3.0)
    model = FakeFlowModel()
    noise = mx.array(np.random.default_rng(2).standard_normal(LATENT_SHAPE).astype(np.float32))

    def run():
        sampler.reset()
        x = noise
        for i in range(4):
            x = sampler.step(mx.array(model(np.array(x), float(sampler.sigmas[i]))), i, x)
        return np.array(x)

    np.testing.assert_array_equal(run(), run())
    with pytest.raises(ValueError, match="reset"):
        sampler.step(noise, 0, noise)


def test_shift_function():
    sigmas = np.array([1.0, 0.5, 0.0])
    np.testing.assert_allclose(shift_sigmas(sigmas, 3.0), [1.0, 0.75, 0.0])
    np.testing.assert_array_equal(shift_sigmas(sigmas, 1.0), sigmas)


def test_official_unshifted_grids():
    assert unipc_flow_sigmas(4)[0] == pytest.approx(0.999, abs=1e-7)
    np.testing.assert_allclose(unipc_flow_sigmas(4), 0.999 * np.array([1.0, 0.75, 0.5, 0.25]), rtol=1e-7)
    np.testing.assert_array_equal(flow_euler_sigmas(4), np.float32([1.0, 0.75, 0.5, 0.25]))


@pytest.mark.parametrize(
    "shift,boundary,high_noise_steps,low_noise_steps",
    [(12.0, 875, 26, 14), (5.0, 900, 15, 25)],  # T2V-A14B and I2V-A14B defaults (Wan-Video/Wan2.2 wan/configs/wan_{t2v,i2v}_A14B.py)
)
def test_a14b_expert_split(shift, boundary, high_noise_steps, low_noise_steps):
    timesteps = make_sampler("unipc", steps=40, shift=shift).timesteps
    assert timesteps[0] == 999
    assert int((timesteps >= boundary).sum()) == high_noise_steps
    assert int((timesteps < boundary).sum()) == low_noise_steps


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'.*euler, unipc"):
        make_sampler("ddim", steps=10, shift=5.0)


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_counts_rejected(kind, steps):
    with pytest.raises(ValueError, match="steps"):
        make_sampler(kind, steps=steps, shift=5.0)


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_step_index_out_of_range(kind):
    sampler = make_sampler(kind, steps=2, shift=1.0)
    x = mx.zeros(LATENT_SHAPE)
    with pytest.raises(ValueError, match="step index"):
        sampler.step(x, 2, x)
