"""First-last frame (--last-image) against diffusers' WanImageToVideoPipeline(last_image=...), at a tiny random
I2V-A14B-style config (three heads of width 16, 13 frames), and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.lora import file_sha256  # noqa: E402
from mlx_video.run import prepare  # noqa: E402
from support.wan import build_tiny_wan_pipeline, decode_like_diffusers, use_official_sigmas  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a paper boat drifts across a pond"
NEGATIVE = "blurry"
WIDTH, HEIGHT, FRAMES = 64, 48, 13


def make_image(path, width, height, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    PIL.fromarray(rgb).resize((width, height), PIL.BILINEAR).save(path)  # smooth, and unlike the other image
    return PIL.open(path).convert("RGB")


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("flf")
    pipe = build_tiny_wan_pipeline(root / "diffusers", two_experts=True, shift=5.0, image_to_video=True, heads=3,
                                   head_dim=16)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    first = make_image(root / "first.png", WIDTH, HEIGHT, 1)
    last = make_image(root / "last.png", WIDTH, HEIGHT, 2)
    return root, pipe, first, last


def test_first_last_frame_matches_diffusers(i2v, tmp_path):
    root, pipe, first, last = i2v
    use_official_sigmas(pipe)
    steps, guidance, guidance_2 = 6, 3.5, 2.0  # the boundary (0.9) falls after step 1: both experts run
    init = np.random.default_rng(7).standard_normal((1, 4, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    common = dict(image=first, last_image=last, prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                  num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance, guidance_scale_2=guidance_2,
                  max_sequence_length=512)
    with torch.no_grad():
        ref = pipe(**common, latents=torch.from_numpy(init), output_type="latent").frames
        ref_frames = decode_like_diffusers(pipe, ref)
    ref = ref.numpy()
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--image", str(root / "first.png"), "--last-image", str(root / "last.png"), "--size", f"{WIDTH}x{HEIGHT}",
          "--frames", str(FRAMES), "--steps", str(steps), "--guidance", str(guidance), "--guidance-2", str(guidance_2),
          "--shift", "5", "--init-latents", str(tmp_path / "init.npy"), "--save-latents", str(tmp_path / "out.npy"),
          "--output", str(tmp_path / "frames"), "--quiet"])
    ours = np.load(tmp_path / "out.npy")
    err = rel_err(ours, ref)
    frames = np.stack([np.asarray(PIL.open(p)) for p in sorted((tmp_path / "frames").glob("*.png"))])
    pixel_err = float(np.abs(frames.astype(np.float64) - np.round(ref_frames * 255)).mean())
    print(f"first-last frame, I2V-A14B-style: latents relative error {err:.2e}, frames mean abs {pixel_err:.3f}/255")
    assert err < 1e-3
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert pixel_err < 1.0
    record = json.loads((tmp_path / "out.json").read_text())["settings"]
    assert set(record["experts"]) == {"transformer", "transformer_2"}
    assert record["last_image"].endswith("last.png")
    assert record["input_files"]["last_image"] == {"name": "last.png", "sha256": file_sha256(root / "last.png")}
    assert record["options"]["last_image"].endswith("last.png")  # replayed by --from-sidecar


def refusal(root, tmp_path, model=None, **options) -> str:
    base = {"model": str(model or root / "mlx"), "prompt": PROMPT, "save_latents": str(tmp_path / "x.npy")}
    with pytest.raises(MlxVideoError) as info:
        prepare({**base, **options}, check_memory=False)
    return str(info.value)


def test_last_image_refusals(i2v, a14b, tmp_path):
    root, _, _, _ = i2v
    first, last = str(root / "first.png"), str(root / "last.png")
    assert "give the first one with --image" in refusal(root, tmp_path, last_image=last)
    message = refusal(root, tmp_path, model=a14b[0] / "mlx", last_image=last, image=first)
    assert "--last-image: for first-last-frame models (wan2.2-i2v-a14b, wan2.1-flf2v-14b)" in message
    assert "wan2.2-t2v-a14b takes no last image" in message
    assert "at least 5 --frames" in refusal(root, tmp_path, image=first, last_image=last, frames=1, size="64x48")
    assert "no chain of clips" in refusal(root, tmp_path, image=first, last_image=last, frames=161, size="64x48")
    assert "no such file" in refusal(root, tmp_path, image=first, last_image=str(tmp_path / "missing.png"),
                                     frames=5, size="64x48")


def test_last_image_on_ti2v_is_refused_by_the_schema():
    """TI2V-5B's image replaces latent frame 0 (diffusers' expand_timesteps path ignores last_image): refused."""
    from mlx_video.options import CAPABILITIES

    _, _, ids = CAPABILITIES["takes_last_image"]
    assert ids() == ["wan2.2-i2v-a14b", "wan2.1-flf2v-14b"]  # Wan2.1 I2V-14B's CLIP context takes one image
