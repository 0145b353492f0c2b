"""End to end: a tiny random diffusers HunyuanVideoPipeline, saved with save_pretrained, converted with
`mlxvid convert`, run with `mlxvid generate`, against the reference run with the official sigma grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from support.hunyuan import build_tiny_hunyuan_pipeline, official_sigmas  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset, cinematic"
NEGATIVE = "static, blurry, low quality"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan")
    pipe = build_tiny_hunyuan_pipeline(root / "diffusers")
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root, pipe


def _reference(pipe, init, steps, guidance, width, height, frames, true_cfg=None, output_type="latent"):
    kwargs = dict(negative_prompt=NEGATIVE, true_cfg_scale=true_cfg) if true_cfg is not None else {}
    with torch.no_grad():
        return pipe(
            prompt=PROMPT, height=height, width=width, num_frames=frames, num_inference_steps=steps,
            guidance_scale=guidance, latents=torch.from_numpy(init), output_type=output_type,
            sigmas=official_sigmas(steps), max_sequence_length=256, **kwargs,
        ).frames


def _ours(root, tag, init, steps, guidance, width, height, frames, extra=()):
    np.save(root / f"init_{tag}.npy", init)
    out = root / f"out_{tag}.npy"
    main([
        "generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", f"{width}x{height}",
        "--frames", str(frames), "--steps", str(steps), "--guidance", str(guidance),
        "--init-latents", str(root / f"init_{tag}.npy"), "--save-latents", str(out), "--quiet", "--overwrite", *extra,
    ])
    return np.load(out), out


def test_converted_folder(tiny):
    root, _ = tiny
    manifest = json.loads((root / "mlx" / "mlxvid.json").read_text())
    assert manifest["family"] == "hunyuan" and manifest["model"] == "hunyuanvideo-t2v"
    assert manifest["vae_stride"] == [4, 8, 8] and manifest["size_multiple"] == 16
    assert manifest["defaults"]["shift"] == 7.0 and manifest["defaults"]["sampler"] == "euler"
    # the Llama layers after the hidden state the text path takes (and the final norm) are not stored
    index = json.loads((root / "mlx" / "text_encoder" / "model.safetensors.index.json").read_text())
    layers = {int(k.split(".")[2]) for k in index["weight_map"] if k.startswith("model.layers.")}
    assert layers == {0, 1, 2} and "model.norm.weight" not in index["weight_map"]


@pytest.mark.parametrize("steps,guidance,frames,width,height", [(4, 6.0, 9, 48, 32), (3, 3.5, 5, 32, 64)])
def test_embedded_guidance_latents_match_diffusers(tiny, steps, guidance, frames, width, height):
    root, pipe = tiny
    t = (frames - 1) // 4 + 1
    init = np.random.default_rng(steps).standard_normal((1, 6, t, height // 8, width // 8)).astype(np.float32)
    ref = _reference(pipe, init, steps, guidance, width, height, frames).numpy()
    ours, out = _ours(root, f"emb{steps}", init, steps, guidance, width, height, frames)
    assert ours.shape == ref.shape
    err = rel_err(ours, ref)
    print(f"HunyuanVideo end to end, embedded guidance {guidance}, {steps} steps: relative error {err:.2e}")
    assert err < 1e-3
    assert rel_err(init, ref) > 0.05  # the run moved away from the start
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["steps"] == steps and sidecar["settings"]["true_cfg"] is None


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_true_cfg_latents_match_diffusers(tiny, mode):
    root, pipe = tiny
    steps, guidance, true_cfg, frames, width, height = 3, 6.0, 4.0, 9, 48, 32
    init = np.random.default_rng(7).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    ref = _reference(pipe, init, steps, guidance, width, height, frames, true_cfg=true_cfg).numpy()
    ours, _ = _ours(root, f"cfg_{mode}", init, steps, guidance, width, height, frames,
                    ["--true-cfg", str(true_cfg), "--negative-prompt", NEGATIVE, "--guidance-mode", mode])
    err = rel_err(ours, ref)
    print(f"HunyuanVideo end to end, true CFG {true_cfg} ({mode}): relative error {err:.2e}")
    assert err < 1e-3
    # true CFG changes the result: without it the same start ends elsewhere
    plain = _reference(pipe, init, steps, guidance, width, height, frames).numpy()
    assert rel_err(plain, ref) > 1e-2


def test_decoded_frames_match_diffusers(tiny):
    from PIL import Image

    root, pipe = tiny
    steps, guidance, frames, width, height = 3, 6.0, 9, 48, 32
    init = np.random.default_rng(3).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    ref = np.asarray(_reference(pipe, init, steps, guidance, width, height, frames, output_type="np")[0], np.float32)
    np.save(root / "init_video.npy", init)
    main([
        "generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", f"{width}x{height}", "--frames",
        str(frames), "--steps", str(steps), "--guidance", str(guidance), "--init-latents", str(root / "init_video.npy"),
        "--output", str(root / "frames"), "--quiet", "--overwrite",
    ])
    files = sorted((root / "frames").glob("frame_*.png"))
    ours = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255.0
    assert ours.shape == ref.shape == (frames, height, width, 3)
    mad = float(np.abs(ours - ref).mean())
    print(f"HunyuanVideo decoded frames: mean |difference| {mad * 255:.3f}/255")
    assert mad < 1 / 255
    assert ref.std() > 0.02  # not a flat image
    assert json.loads((root / "frames.json").read_text())["settings"]["vae_peak_memory_bytes"] > 0


def test_bad_input_is_refused_before_weights(tiny):
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, _ = tiny
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    assert type(pipe).__name__ == "HunyuanPipeline" and pipe.latent_channels == 6
    s = pipe.resolve(GenerationSettings(prompt=PROMPT))
    assert (s.width, s.height, s.frames, s.steps, s.shift, s.guidance, s.fps) == (1280, 720, 129, 50, 7.0, 6.0, 24)
    assert (s.sampler, s.schedule) == ("euler", "shifted-linear")
    with pytest.raises(MlxVideoError, match="multiples of 16"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, width=40, height=32))
    with pytest.raises(MlxVideoError, match="4n\\+1"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, width=48, height=32, frames=8))
    with pytest.raises(MlxVideoError, match="tokens long"):
        pipe.resolve(GenerationSettings(prompt="the camera pans " * 120, width=48, height=32, frames=9))
    with pytest.raises(MlxVideoError, match="--guidance-2"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, guidance_2=3.0))
    # the preflight names every stage, the 8B-style text encoder included
    estimate = pipe.estimate_memory(s)
    assert set(estimate["stages"]) == {"text_encoding", "denoising", "decoding"}


@pytest.mark.parametrize("layout", ["official", "comfyui"])
def test_official_named_transformer_over_the_folder(tiny, tmp_path, layout):
    """The release's mp_rank_00_model_states.pt (a state dict under `module`), or a ComfyUI single file (official
    names under `model.diffusion_model.`), replacing the folder's transformer: the same video as diffusers."""
    from safetensors.torch import save_file
    from support.hunyuan import official_state

    root, pipe = tiny
    official = official_state({k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()})
    if layout == "official":
        path = tmp_path / "mp_rank_00_model_states.pt"
        torch.save({"module": official}, path)
    else:
        path = tmp_path / "hunyuan_video_720_cfgdistill_bf16.safetensors"
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in official.items()}, str(path))
    dst = tmp_path / "mlx"
    main(["convert", str(root / "diffusers"), str(dst), "--transformer", str(path), "--dtype", "fp32"])
    manifest = json.loads((dst / "mlxvid.json").read_text())
    assert "--transformer" in manifest["source"]["format"]

    steps, guidance, frames, width, height = 3, 6.0, 9, 48, 32
    init = np.random.default_rng(11).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    ref = _reference(pipe, init, steps, guidance, width, height, frames).numpy()
    np.save(tmp_path / "init.npy", init)
    main(["generate", "--model", str(dst), "--prompt", PROMPT, "--size", f"{width}x{height}", "--frames", str(frames),
          "--steps", str(steps), "--guidance", str(guidance), "--init-latents", str(tmp_path / "init.npy"),
          "--save-latents", str(tmp_path / "out.npy"), "--quiet"])
    err = rel_err(np.load(tmp_path / "out.npy"), ref)
    print(f"HunyuanVideo end to end, {layout} transformer file: relative error {err:.2e}")
    assert err < 1e-3


def test_bf16_conversion_runs_close_to_fp32(tiny, tmp_path):
    root, _ = tiny
    main(["convert", str(root / "diffusers"), str(tmp_path / "bf16"), "--dtype", "bf16"])
    init = np.random.default_rng(5).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    out = {}
    for name, model in (("fp32", root / "mlx"), ("bf16", tmp_path / "bf16")):
        main(["generate", "--model", str(model), "--prompt", PROMPT, "--size", "48x32", "--frames", "9", "--steps", "3",
              "--true-cfg", "3", "--negative-prompt", NEGATIVE, "--init-latents", str(tmp_path / "init.npy"),
              "--save-latents", str(tmp_path / f"{name}.npy"), "--quiet"])
        out[name] = np.load(tmp_path / f"{name}.npy")
    err = rel_err(out["bf16"], out["fp32"])
    print(f"HunyuanVideo bf16 vs fp32 weights: relative difference {err:.2e}")
    assert np.isfinite(out["bf16"]).all() and err < 5e-2
