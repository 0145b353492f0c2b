"""End to end: a tiny random diffusers WanPipeline, converted with `mlxvid convert`, run with `mlxvid generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from tiny_wan import build_tiny_wan_pipeline, use_official_sigmas  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset"
NEGATIVE = "static, blurry"


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    root = tmp_path_factory.mktemp("a14b")
    pipe = build_tiny_wan_pipeline(root / "diffusers", two_experts=True, shift=12.0)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root, pipe


# (guidance 1, guidance_2 > 1) is left out on purpose: diffusers then skips guidance for both experts, while the
# official code (and mlxvid) still guides the low-noise expert.
@pytest.mark.parametrize("steps,guidance,guidance_2", [(6, 4.0, 3.0), (3, 2.5, 1.0), (3, 1.0, 1.0)])
def test_a14b_latents_match_diffusers(a14b, steps, guidance, guidance_2):
    root, pipe = a14b
    width, height, frames = 48, 32, 9  # latent 3 x 4 x 6
    init = np.random.default_rng(steps).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(root / "init.npy", init)

    use_official_sigmas(pipe)
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=guidance, guidance_scale_2=guidance_2,
            latents=torch.from_numpy(init), output_type="latent", max_sequence_length=512,
        ).frames.numpy()

    out = root / f"out_{steps}.npy"
    main([
        "generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--size", f"{width}x{height}", "--frames", str(frames), "--steps", str(steps), "--guidance", str(guidance),
        "--guidance-2", str(guidance_2), "--shift", "12", "--init-latents", str(root / "init.npy"),
        "--save-latents", str(out), "--quiet", "--overwrite",
    ])
    ours = np.load(out)
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    print(f"A14B-style end to end, {steps} steps: relative error {err:.2e}")
    assert err < 1e-3
    # the run actually moved away from the start, and both experts ran
    assert rel_err(init, ref) > 0.05
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["steps"] == steps
    assert set(sidecar["settings"]["experts"]) == {"transformer", "transformer_2"}
