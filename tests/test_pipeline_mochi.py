"""End to end: a tiny random diffusers MochiPipeline, saved with save_pretrained, converted with `mlxvid convert`,
run with `mlxvid generate`, against the reference (classifier-free guidance with a negative prompt, the
linear-quadratic schedule, Mochi's t = 1 - sigma convention)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from support.mochi import build_tiny_mochi_pipeline  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset, cinematic"
NEGATIVE = "static, blurry, low quality"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mochi")
    pipe = build_tiny_mochi_pipeline(root / "diffusers")
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root, pipe


def _init(seed, frames, width, height):
    t = (frames - 1) // 6 + 1
    return np.random.default_rng(seed).standard_normal((1, 12, t, height // 8, width // 8)).astype(np.float32)


def _reference(pipe, init, steps, guidance, width, height, frames, negative=NEGATIVE, output_type="latent"):
    with torch.no_grad():
        return pipe(
            prompt=PROMPT, negative_prompt=negative, height=height, width=width, num_frames=frames,
            num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(init),
            output_type=output_type, max_sequence_length=256,
        ).frames


def _ours(root, model, tag, init, steps, guidance, width, height, frames, extra=()):
    np.save(root / f"init_{tag}.npy", init)
    out = root / f"out_{tag}.npy"
    main([
        "generate", "--model", str(model), "--prompt", PROMPT, "--size", f"{width}x{height}", "--frames", str(frames),
        "--steps", str(steps), "--guidance", str(guidance), "--init-latents", str(root / f"init_{tag}.npy"),
        "--save-latents", str(out), "--quiet", "--overwrite", *extra,
    ])
    return np.load(out), out


def test_converted_folder(tiny):
    root, _ = tiny
    manifest = json.loads((root / "mlx" / "mlxvid.json").read_text())
    assert manifest["family"] == "mochi" and manifest["model"] == "mochi-1-preview" and manifest["task"] == "t2v"
    assert manifest["vae_stride"] == [6, 8, 8] and manifest["size_multiple"] == 16 and manifest["experts"] == 1
    d = manifest["defaults"]
    assert (d["sampler"], d["schedule"], d["steps"], d["frames"], d["fps"]) == ("euler", "linear-quadratic", 64, 163, 30)
    assert d["zero_empty_prompt"] is False  # model_index.json's force_zeros_for_empty_prompt
    assert (root / "mlx" / "tokenizer" / "spiece.model").is_file()
    # the VAE is stored in float32 whatever --dtype says; q/k/v are stored fused
    config = json.loads((root / "mlx" / "transformer" / "config.json").read_text())
    assert (config["num_heads"], config["head_dim"], config["text_dim"]) == (3, 20, 36)


@pytest.mark.parametrize("mode,steps,guidance,frames,width,height", [
    ("batched", 4, 4.5, 13, 48, 32),
    ("sequential", 3, 6.0, 7, 32, 64),
])
def test_cfg_latents_match_diffusers(tiny, mode, steps, guidance, frames, width, height):
    root, pipe = tiny
    init = _init(steps, frames, width, height)
    ref = _reference(pipe, init, steps, guidance, width, height, frames).numpy()
    ours, out = _ours(root, root / "mlx", f"cfg_{mode}", init, steps, guidance, width, height, frames,
                      ["--negative-prompt", NEGATIVE, "--guidance-mode", mode])
    assert ours.shape == ref.shape == init.shape
    err = rel_err(ours, ref)
    print(f"Mochi end to end, CFG {guidance} ({mode}), {steps} steps, {frames} frames {width}x{height}: "
          f"relative error {err:.2e}")
    assert err < 1e-3
    assert rel_err(init, ref) > 0.05  # the run moved away from the start
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["settings"]["schedule"] == "linear-quadratic" and sidecar["settings"]["steps"] == steps


def test_guidance_one_runs_the_conditional_pass_alone(tiny):
    root, pipe = tiny
    init = _init(9, 7, 48, 32)
    ref = _reference(pipe, init, 3, 1.0, 48, 32, 7).numpy()
    ours, _ = _ours(root, root / "mlx", "g1", init, 3, 1.0, 48, 32, 7, ["--negative-prompt", NEGATIVE])
    err = rel_err(ours, ref)
    print(f"Mochi end to end, guidance 1: relative error {err:.2e}")
    assert err < 1e-3
    guided = _reference(pipe, init, 3, 4.5, 48, 32, 7).numpy()
    assert rel_err(guided, ref) > 1e-2  # the negative prompt matters at guidance > 1


def test_zeroed_empty_negative_prompt(tiny, tmp_path):
    """force_zeros_for_empty_prompt (the official code's handling of an empty negative prompt: ids 0, no text
    token attended): the manifest's zero_empty_prompt does the same, batched and one prompt at a time."""
    root, pipe = tiny
    model = tmp_path / "mlx"
    shutil.copytree(root / "mlx", model)
    manifest = json.loads((model / "mlxvid.json").read_text())
    manifest["defaults"]["zero_empty_prompt"] = True
    (model / "mlxvid.json").write_text(json.dumps(manifest))
    init = _init(4, 7, 48, 32)
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    try:
        ref = _reference(pipe, init, 3, 4.5, 48, 32, 7, negative="").numpy()
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
    plain = _reference(pipe, init, 3, 4.5, 48, 32, 7, negative="").numpy()
    assert rel_err(plain, ref) > 1e-3  # zeroing changes the result
    for mode in ("batched", "sequential"):
        ours, _ = _ours(tmp_path, model, f"zero_{mode}", init, 3, 4.5, 48, 32, 7,
                        ["--negative-prompt", "", "--guidance-mode", mode])
        err = rel_err(ours, ref)
        print(f"Mochi end to end, zeroed empty negative prompt ({mode}): relative error {err:.2e}")
        assert err < 1e-3


def test_decoded_frames_match_diffusers(tiny):
    from PIL import Image

    root, pipe = tiny
    steps, guidance, frames, width, height = 3, 4.5, 13, 48, 32
    init = _init(3, frames, width, height)
    ref = np.asarray(_reference(pipe, init, steps, guidance, width, height, frames, output_type="np")[0], np.float32)
    np.save(root / "init_video.npy", init)
    for tiling in ("off", "on"):  # all latent frames at once, and one at a time
        out = root / f"frames_{tiling}"
        main([
            "generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--size",
            f"{width}x{height}", "--frames", str(frames), "--steps", str(steps), "--guidance", str(guidance),
            "--init-latents", str(root / "init_video.npy"), "--output", str(out), "--vae-tiling", tiling, "--quiet",
            "--overwrite",
        ])
        files = sorted(out.glob("frame_*.png"))
        ours = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255.0
        assert ours.shape == ref.shape == (frames, height, width, 3)
        mad = float(np.abs(ours - ref).mean())
        print(f"Mochi decoded frames (--vae-tiling {tiling}): mean |difference| {mad * 255:.3f}/255")
        assert mad < 1 / 255
        sidecar = json.loads(out.with_suffix(".json").read_text())["settings"]
        assert sidecar["vae_peak_memory_bytes"] > 0 and sidecar["vae_chunk_frames"] == (1 if tiling == "on" else None)
    assert ref.std() > 0.02  # not a flat image


def test_bad_input_is_refused_before_weights(tiny):
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, _ = tiny
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    assert type(pipe).__name__ == "MochiPipeline" and pipe.latent_channels == 12
    s = pipe.resolve(GenerationSettings(prompt=PROMPT))
    assert (s.width, s.height, s.frames, s.steps, s.shift, s.guidance, s.fps) == (848, 480, 163, 64, 1.0, 4.5, 30)
    assert (s.sampler, s.schedule, s.negative_prompt) == ("euler", "linear-quadratic", "")
    assert pipe.latent_shape(s) == (1, 12, 28, 60, 106)
    with pytest.raises(MlxVideoError, match="6n\\+1"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, width=48, height=32, frames=9))
    with pytest.raises(MlxVideoError, match="multiples of 16"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, width=40, height=32, frames=7))
    with pytest.raises(MlxVideoError, match="longer than the 255 tokens"):
        pipe.resolve(GenerationSettings(prompt="the camera pans " * 200, width=48, height=32, frames=7))
    with pytest.raises(MlxVideoError, match="negative prompt is longer"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, negative_prompt="rain " * 300, width=48, height=32, frames=7))
    with pytest.raises(MlxVideoError, match="no shift"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, shift=3.0, width=48, height=32, frames=7))
    with pytest.raises(MlxVideoError, match="--true-cfg"):
        pipe.resolve(GenerationSettings(prompt=PROMPT, true_cfg=3.0))
    with pytest.raises(MlxVideoError, match="--vae-tiling"):
        pipe.vae_tile("sometimes", (1, 1))
    estimate = pipe.estimate_memory(s)
    assert set(estimate["stages"]) == {"text_encoding", "denoising", "decoding"}
    # chunked decoding bounds the decoder's working set: one latent frame at a time needs far less than all 28
    on, off = (pipe.estimate_memory(s, tiling=m)["stages"]["decoding"] for m in ("on", "off"))
    assert on < off / 5


def test_official_named_transformer_over_the_folder(tiny, tmp_path):
    """The release's dit.safetensors names (official, fused q|k|v, [gate | proj] SwiGLU halves), and ComfyUI's
    prefix, replacing the folder's transformer: the same latents as diffusers."""
    from safetensors.torch import save_file
    from support.mochi import official_state_dict

    root, pipe = tiny
    official = official_state_dict({k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()},
                                   pipe.transformer.config.num_layers)
    path = tmp_path / "mochi_preview_bf16.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in official.items()}, str(path))
    dst = tmp_path / "mlx"
    main(["convert", str(root / "diffusers"), str(dst), "--transformer", str(path), "--dtype", "fp32"])
    assert "--transformer" in json.loads((dst / "mlxvid.json").read_text())["source"]["format"]
    init = _init(11, 7, 48, 32)
    ref = _reference(pipe, init, 3, 4.5, 48, 32, 7).numpy()
    ours, _ = _ours(tmp_path, dst, "official", init, 3, 4.5, 48, 32, 7, ["--negative-prompt", NEGATIVE])
    err = rel_err(ours, ref)
    print(f"Mochi end to end, official-named transformer file: relative error {err:.2e}")
    assert err < 1e-3


def test_bf16_conversion_runs_close_to_fp32(tiny, tmp_path, monkeypatch):
    """--dtype bf16 keeps pos_frequencies and the q/k norm gains in float32 (as the official code does), which
    brings the bf16 run closer to the fp32 one than storing them in bf16 does."""
    import mlx.core as mx

    from mlx_video.families.mochi import planner as mochi_planner

    root, _ = tiny
    main(["convert", str(root / "diffusers"), str(tmp_path / "bf16"), "--dtype", "bf16"])
    monkeypatch.setattr(mochi_planner, "KEEP_FP32_TRANSFORMER", None)
    main(["convert", str(root / "diffusers"), str(tmp_path / "bf16_all"), "--dtype", "bf16"])

    stored = {k: v.dtype for f in sorted((tmp_path / "bf16" / "transformer").glob("*.safetensors"))
              for k, v in mx.load(str(f)).items()}
    kept = sorted(k for k, d in stored.items() if d == mx.float32)
    assert kept == sorted(["pos_frequencies"] + [f"blocks.{i}.attn.norm_{a}_{b}.weight"
                                                 for i in range(2) for a in "qk" for b in "xy"])
    assert all(d == mx.bfloat16 for k, d in stored.items() if k not in kept)
    assert all(v.dtype == mx.bfloat16 for f in (tmp_path / "bf16_all" / "transformer").glob("*.safetensors")
               for v in mx.load(str(f)).values())

    init = _init(5, 7, 48, 32)
    models = {"fp32": root / "mlx", "bf16": tmp_path / "bf16", "bf16_all": tmp_path / "bf16_all"}
    out = {name: _ours(tmp_path, model, name, init, 3, 4.5, 48, 32, 7, ["--negative-prompt", NEGATIVE])[0]
           for name, model in models.items()}
    err = rel_err(out["bf16"], out["fp32"])
    err_all = rel_err(out["bf16_all"], out["fp32"])
    print(f"Mochi bf16 vs fp32 weights: relative difference {err:.2e} (RoPE frequencies and q/k norm gains kept in "
          f"float32), {err_all:.2e} (everything in bf16)")
    assert np.isfinite(out["bf16"]).all() and 1e-6 < err < 1e-1
    assert err < 0.8 * err_all


def test_official_vae_halves_over_the_folder(tiny, tmp_path):
    """`--vae decoder.safetensors` (the release's VAE: encoder.safetensors beside it, official module names, fused
    q|k|v) stores exactly the tensors the diffusers VAE of the same weights converts to. A VAE with the published
    layer counts (the official names number modules by position in that layout), at small widths."""
    from diffusers import AutoencoderKLMochi
    from safetensors.torch import save_file
    from support.mochi import official_vae_state_dicts
    from support.mochi import randomize_

    import mlx.core as mx

    root, _ = tiny
    src = tmp_path / "diffusers"
    shutil.copytree(root / "diffusers", src)
    shutil.rmtree(src / "vae")
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
                             latent_channels=12).eval()
    randomize_(vae, 21)
    vae.save_pretrained(src / "vae")
    decoder, encoder = official_vae_state_dicts({k: v.detach() for k, v in vae.state_dict().items()})
    (tmp_path / "official").mkdir()
    save_file({k: v.contiguous() for k, v in decoder.items()}, str(tmp_path / "official" / "decoder.safetensors"))
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(tmp_path / "official" / "encoder.safetensors"))

    main(["convert", str(src), str(tmp_path / "a"), "--dtype", "fp32"])
    main(["convert", str(src), str(tmp_path / "b"), "--dtype", "fp32", "--vae",
          str(tmp_path / "official" / "decoder.safetensors")])
    assert "--vae" in json.loads((tmp_path / "b" / "mlxvid.json").read_text())["source"]["format"]

    def stored(folder):
        out = {}
        for f in sorted((folder / "vae").glob("*.safetensors")):
            out.update(mx.load(str(f)))
        return out

    a, b = stored(tmp_path / "a"), stored(tmp_path / "b")
    assert set(a) == set(b) and len(a) > 100
    for k in a:
        assert a[k].dtype == b[k].dtype == mx.float32 and mx.array_equal(a[k], b[k]).item(), k

    # the encoder half is needed too (the VAE module holds both); its absence is named
    (tmp_path / "official" / "encoder.safetensors").unlink()
    from mlx_video.convert.convert import plan

    with pytest.raises(MlxVideoError, match="encoder.safetensors is missing"):
        plan(src, {"vae": tmp_path / "official" / "decoder.safetensors"})


def test_q8_conversion_runs_close_to_fp32(tmp_path):
    """--quantize q8 stores the block linears (LOW_PRECISION_TRANSFORMER) as 8-bit groups; widths that the
    group size divides (2 heads of 32, text stream 64) so that they are quantized; the result stays close."""
    build_tiny_mochi_pipeline(tmp_path / "diffusers", seed=3, transformer_dims=dict(
        num_attention_heads=2, attention_head_dim=32, pooled_projection_dim=64, text_embed_dim=64))
    for name, extra in (("fp32", []), ("q8", ["--quantize", "q8", "--group-size", "32"])):
        main(["convert", str(tmp_path / "diffusers"), str(tmp_path / name), "--dtype", "fp32", *extra])
    manifest = json.loads((tmp_path / "q8" / "mlxvid.json").read_text())
    assert manifest["quantization"]["mode"] == "q8"
    index = json.loads((tmp_path / "q8" / "transformer" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "blocks.0.attn.qkv_x.scales" in index and "blocks.1.mod_y.scales" in index
    assert "final_layer.linear.scales" not in index and "text_pool.to_kv.scales" not in index
    init = _init(8, 7, 48, 32)
    out = {name: _ours(tmp_path, tmp_path / name, name, init, 3, 4.5, 48, 32, 7, ["--negative-prompt", NEGATIVE])[0]
           for name in ("fp32", "q8")}
    err = rel_err(out["q8"], out["fp32"])
    print(f"Mochi q8 vs fp32 weights: relative difference {err:.2e}")
    assert np.isfinite(out["q8"]).all() and 1e-6 < err < 5e-2
