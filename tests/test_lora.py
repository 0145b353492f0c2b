"""LoRA loading: parity with diffusers' `load_lora_weights` on a tiny A14B-style pipeline, in the three key
namings people download (ComfyUI/lightx2v, diffusers/PEFT, kohya/musubi), per expert and with strengths; the
errors for bad input; fusing into quantized layers."""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_video.cli import main
from mlx_video.errors import MlxVideoError
from support.tensor_files import save_f32
from support.arrays import rel_err

PROMPT = "a corgi surfs a wave at sunset"
NEGATIVE = "static, blurry"
LINEARS = {"self_attn": "qkvo", "cross_attn": "qkvo"}
DIFFUSERS_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}


def _layers(dim=24, ffn=40, blocks=2):
    """(official module name, out, in) of every linear LoRAs usually target in the tiny model."""
    out = []
    for b in range(blocks):
        for attn, letters in LINEARS.items():
            out += [(f"blocks.{b}.{attn}.{c}", dim, dim) for c in letters]
        out += [(f"blocks.{b}.ffn.0", ffn, dim), (f"blocks.{b}.ffn.2", dim, ffn)]
    return out


def _official_to_diffusers(name: str) -> str:
    b, rest = name.split(".")[1], name.split(".", 2)[2]
    if rest.startswith("ffn"):
        return f"blocks.{b}.ffn.net.0.proj" if rest == "ffn.0" else f"blocks.{b}.ffn.net.2"
    attn, letter = rest.split(".")
    return f"blocks.{b}.{'attn1' if attn == 'self_attn' else 'attn2'}.{DIFFUSERS_NAMES[letter]}"


def comfy_lora(path, rank, alpha, seed, with_bias=True):
    rng = np.random.default_rng(seed)
    t = {}
    for name, o, i in _layers():
        t[f"diffusion_model.{name}.lora_down.weight"] = rng.standard_normal((rank, i)) / np.sqrt(i)
        t[f"diffusion_model.{name}.lora_up.weight"] = rng.standard_normal((o, rank)) * 0.3
        t[f"diffusion_model.{name}.alpha"] = np.array(alpha)
        if with_bias and (name.endswith(".q") or name.endswith("ffn.0")):
            t[f"diffusion_model.{name}.diff_b"] = rng.standard_normal(o) * 0.1
    return save_f32(path, t)


def kohya_lora(path, rank, alpha, seed):
    rng = np.random.default_rng(seed)
    t = {}
    for name, o, i in _layers():
        key = "lora_unet_" + name.replace(".", "_")
        t[f"{key}.lora_down.weight"] = rng.standard_normal((rank, i)) / np.sqrt(i)
        t[f"{key}.lora_up.weight"] = rng.standard_normal((o, rank)) * 0.3
        t[f"{key}.alpha"] = np.array(alpha)
    return save_f32(path, t)


def peft_lora(path, rank, alpha, seed):
    """Written by diffusers' own `save_lora_weights`, with the adapter config (alpha != rank) in the header."""
    import torch
    from diffusers import WanPipeline

    rng = np.random.default_rng(seed)
    t = {}
    for name, o, i in _layers():
        key = _official_to_diffusers(name)
        t[f"{key}.lora_A.weight"] = torch.from_numpy((rng.standard_normal((rank, i)) / np.sqrt(i)).astype(np.float32))
        t[f"{key}.lora_B.weight"] = torch.from_numpy((rng.standard_normal((o, rank)) * 0.3).astype(np.float32))
    targets = sorted({_official_to_diffusers(n).split(".", 2)[2] for n, _, _ in _layers()})
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
    WanPipeline.save_lora_weights(str(path.parent), transformer_lora_layers=t, transformer_lora_adapter_metadata=meta,
                                  weight_name=path.name)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "comfy": comfy_lora(root / "high_noise_model.safetensors", rank=3, alpha=6.0, seed=1),
        "kohya": kohya_lora(root / "style_kohya.safetensors", rank=4, alpha=2.0, seed=2),
        "peft": peft_lora(root / "low_peft.safetensors", rank=5, alpha=10.0, seed=3),
        "root": root,
    }


def _reference(pipe, init, steps, guidance, guidance_2):
    import torch
    from support.wan import use_official_sigmas

    use_official_sigmas(pipe)
    with torch.no_grad():
        return pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=9, num_inference_steps=steps,
            guidance_scale=guidance, guidance_scale_2=guidance_2, latents=torch.from_numpy(init), output_type="latent",
            max_sequence_length=512,
        ).frames.numpy()


def _ours(root, out, steps, guidance, guidance_2, extra):
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--size", "48x32",
          "--frames", "9", "--steps", str(steps), "--guidance", str(guidance), "--guidance-2", str(guidance_2),
          "--shift", "12", "--init-latents", str(root / "lora_init.npy"), "--save-latents", str(out), "--quiet",
          "--overwrite", *extra])
    return np.load(out), json.loads(out.with_suffix(".json").read_text())


def test_lora_parity_with_diffusers(a14b, loras):
    """ComfyUI naming on the high-noise expert, PEFT naming on the low-noise one, kohya naming on both, each
    with its own strength; diffusers loads them with load_lora_weights (load_into_transformer_2 for the
    low-noise expert) and set_adapters weights."""
    pytest.importorskip("peft")
    root, pipe = a14b
    steps, guidance, guidance_2 = 4, 3.0, 2.0
    init = np.random.default_rng(11).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(root / "lora_init.npy", init)

    ref_pipe = copy.deepcopy(pipe)
    base = _reference(ref_pipe, init, steps, guidance, guidance_2)
    ref_pipe.load_lora_weights(str(loras["comfy"]), adapter_name="comfy", low_cpu_mem_usage=False)
    ref_pipe.load_lora_weights(str(loras["kohya"]), adapter_name="kohya")
    ref_pipe.load_lora_weights(str(loras["kohya"]), adapter_name="kohya", load_into_transformer_2=True)
    ref_pipe.load_lora_weights(str(loras["peft"]), adapter_name="peft", load_into_transformer_2=True)
    ref_pipe.transformer.set_adapters(["comfy", "kohya"], weights=[0.8, 0.5])
    ref_pipe.transformer_2.set_adapters(["kohya", "peft"], weights=[0.5, 1.3])
    ref = _reference(ref_pipe, init, steps, guidance, guidance_2)

    ours, sidecar = _ours(root, root / "lora_out.npy", steps, guidance, guidance_2, [
        "--lora-high", f"{loras['comfy']}:0.8", "--lora", f"{loras['kohya']}:0.5", "--lora-low", f"{loras['peft']}:1.3"])
    err = rel_err(ours, ref)
    effect = rel_err(base, ref)
    print(f"LoRA parity (comfy high 0.8 + kohya both 0.5 + peft low 1.3): relative error {err:.2e}; the LoRAs move "
          f"the result by {effect:.2f}")
    assert effect > 0.05  # the LoRAs matter
    assert err < 1e-3
    records = sidecar["settings"]["loras"]
    assert [(r["name"], r["scale"], r["target"]) for r in records] == [
        ("style_kohya.safetensors", 0.5, "all"), ("high_noise_model.safetensors", 0.8, "high"),
        ("low_peft.safetensors", 1.3, "low")]
    import hashlib

    assert records[1]["sha256"] == hashlib.sha256(loras["comfy"].read_bytes()).hexdigest()
    assert {r["format"] for r in records} == {"kohya", "comfy", "peft"}
    assert sidecar["settings"]["transformer_evals"] == 2 * steps and sidecar["settings"]["reused_steps"] == []


def test_lightning_recipe_with_loras_matches_diffusers_euler(a14b, loras):
    """The 4-step recipe (Euler, σ = [1, .9375, .8333, .625], no CFG) with a high/low LoRA pair equals diffusers'
    flow Euler scheduler given the same sigmas."""
    pytest.importorskip("peft")
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    root, pipe = a14b
    init = np.random.default_rng(5).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(root / "lora_init.npy", init)
    ref_pipe = copy.deepcopy(pipe)
    ref_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref_pipe.load_lora_weights(str(loras["comfy"]), adapter_name="hi", low_cpu_mem_usage=False)
    ref_pipe.load_lora_weights(str(loras["peft"]), adapter_name="lo", load_into_transformer_2=True)
    sigmas = [1.0, 0.9375, 0.8333333, 0.625]  # Wan2.2-Lightning's published grid, written out
    original = ref_pipe.scheduler.set_timesteps
    ref_pipe.scheduler.set_timesteps = lambda num_inference_steps=None, device=None, **kw: original(
        device=device, sigmas=sigmas)
    with torch.no_grad():
        ref = ref_pipe(prompt=PROMPT, height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=1.0,
                       guidance_scale_2=1.0, latents=torch.from_numpy(init), output_type="latent",
                       max_sequence_length=512).frames.numpy()
    out = root / "lightning.npy"
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--frames", "9",
          "--recipe", "lightning", "--lora-high", str(loras["comfy"]), "--lora-low", str(loras["peft"]),
          "--init-latents", str(root / "lora_init.npy"), "--save-latents", str(out), "--quiet", "--overwrite"])
    sidecar = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert sidecar["steps"] == 4 and sidecar["sampler"] == "euler" and sidecar["guidance"] == 1.0
    assert sidecar["experts"] == ["transformer", "transformer", "transformer_2", "transformer_2"]
    err = rel_err(np.load(out), ref)
    print(f"lightning recipe + LoRAs vs diffusers Euler: relative error {err:.2e}")
    assert err < 1e-3


# ---- bad input: clear errors naming the file and the key, before any denoising step ----


def _generate_error(root, extra, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--frames", "9",
              "--steps", "2", "--save-latents", str(root / "never.npy"), "--quiet", "--overwrite", *extra])
    assert not (root / "never.npy").exists()
    return capsys.readouterr().err


def test_lora_for_another_width(a14b, loras, capsys, no_denoising):
    root, _ = a14b
    path = root / "wide.safetensors"
    save_f32(path, {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": np.zeros((4, 5120)),
                    "diffusion_model.blocks.0.self_attn.q.lora_up.weight": np.zeros((5120, 4))})
    err = _generate_error(root, ["--lora", str(path)], capsys)
    assert "wide.safetensors" in err and "blocks.0.self_attn.q.lora_down.weight" in err and "5120" in err


def test_lora_for_another_model(a14b, capsys, no_denoising):
    root, _ = a14b
    path = root / "flux.safetensors"
    save_f32(path, {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((4, 24)),
                    "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((24, 4))})
    err = _generate_error(root, ["--lora", str(path)], capsys)
    assert "flux.safetensors" in err and "single_transformer_blocks.0.attn.to_q.lora_A.weight" in err


def test_lora_for_deeper_model(a14b, capsys, no_denoising):
    root, _ = a14b
    path = root / "deep.safetensors"
    save_f32(path, {"diffusion_model.blocks.7.ffn.0.lora_down.weight": np.zeros((4, 24)),
                    "diffusion_model.blocks.7.ffn.0.lora_up.weight": np.zeros((40, 4))})
    err = _generate_error(root, ["--lora-low", str(path)], capsys)
    assert "deep.safetensors" in err and "blocks.7.ffn.0.lora_down.weight" in err


def test_file_without_lora_keys(a14b, capsys, no_denoising):
    root, _ = a14b
    path = root / "plain.safetensors"
    save_f32(path, {"blocks.0.self_attn.q.weight": np.zeros((24, 24))})
    err = _generate_error(root, ["--lora", str(path)], capsys)
    assert "plain.safetensors" in err and "blocks.0.self_attn.q.weight" in err and "not LoRA tensors" in err


def test_rank_mismatch(a14b, capsys, no_denoising):
    root, _ = a14b
    path = root / "rank.safetensors"
    save_f32(path, {"diffusion_model.blocks.1.cross_attn.k.lora_down.weight": np.zeros((4, 24)),
                    "diffusion_model.blocks.1.cross_attn.k.lora_up.weight": np.zeros((24, 8))})
    err = _generate_error(root, ["--lora", str(path)], capsys)
    assert "rank.safetensors" in err and "blocks.1.cross_attn.k.lora_up.weight" in err and "rank mismatch" in err


def test_half_a_pair(a14b, capsys, no_denoising):
    root, _ = a14b
    path = root / "half.safetensors"
    save_f32(path, {"diffusion_model.blocks.1.cross_attn.k.lora_down.weight": np.zeros((4, 24))})
    err = _generate_error(root, ["--lora", str(path)], capsys)
    assert "half.safetensors" in err and "blocks.1.cross_attn.k.lora_down.weight" in err and "no matching up" in err


def test_strength_not_a_number(a14b, loras, capsys, no_denoising):
    root, _ = a14b
    err = _generate_error(root, ["--lora", f"{loras['comfy']}:strong"], capsys)
    assert "high_noise_model.safetensors" in err and "'strong'" in err and "number" in err


def test_missing_file(a14b, capsys, no_denoising):
    root, _ = a14b
    err = _generate_error(root, ["--lora", str(root / "nowhere.safetensors")], capsys)
    assert "nowhere.safetensors" in err and "does not exist" in err


# ---- unit level: key mapping and quantized fusing ----


def test_key_namings_map_to_the_same_layers(loras):
    from mlx_video.families.wan.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER
    from mlx_video.lora import read_lora

    maps = [DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER]
    targets = {name: set(read_lora(loras[name], maps).modules) for name in ("comfy", "kohya", "peft")}
    assert targets["comfy"] == targets["kohya"] == targets["peft"]
    assert "blocks.1.ffn.fc2" in targets["comfy"] and "blocks.0.self_attn.o" in targets["peft"]


def _fused_layer_error(kind: str) -> tuple[float, float]:
    """(error of the fused low-precision weight vs the exact fused weight, the conversion's own error)."""
    from mlx_video.lora import LoraFile, ModuleLora, fuse_loras
    from mlx_video.nn.linear import Fp8Linear, dense_weight

    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((96, 128)).astype(np.float32) / np.sqrt(128))
    down = mx.array(rng.standard_normal((8, 128)).astype(np.float32) / np.sqrt(128))
    up = mx.array(rng.standard_normal((96, 8)).astype(np.float32) * 0.2)
    exact = w + 0.7 * 0.5 * (up @ down)  # strength 0.7, alpha/rank = 4/8

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(128, 96)

    m = M()
    m.layer.weight = w
    if kind in ("q8", "q4"):
        nn.quantize(m, group_size=64, bits=int(kind[1]))
    else:
        from mlx_video.convert.fp8 import E4M3FN_MAX, encode_e4m3fn

        scale = float(mx.max(mx.abs(w)).item()) / E4M3FN_MAX
        fp8 = Fp8Linear(128, 96, True, "e4m3fn", (), mx.float32)
        fp8.weight = mx.array(encode_e4m3fn(np.array(w) / scale))
        fp8.weight_scale = mx.array(scale, dtype=mx.float32)
        fp8.bias = m.layer.bias
        m.layer = fp8
    stored = dense_weight(m.layer, mx.float32)
    lora = LoraFile(path=None, sha256="", format="comfy", default_scale=None, modules={
        "layer": ModuleLora("layer", "layer", {"down": "d", "up": "u"}, down=down, up=up, alpha=4.0)})
    assert fuse_loras(m, [(lora, 0.7)]) == 1
    assert type(m.layer).__name__ == ("QuantizedLinear" if kind != "fp8" else "Fp8Linear")
    fused = dense_weight(m.layer, mx.float32)
    return rel_err(np.array(fused), np.array(exact)), rel_err(np.array(stored), np.array(w))


@pytest.mark.parametrize("kind", ["q8", "q4", "fp8"])
def test_fuse_into_low_precision_layers(kind):
    fused_err, own_err = _fused_layer_error(kind)
    print(f"{kind}: fused weight error {fused_err:.2e} (the conversion's own error {own_err:.2e})")
    # one re-quantization: the error of the fused weight is that of quantizing any weight of this size
    assert fused_err < 2.0 * own_err
    assert fused_err < {"q8": 0.01, "q4": 0.15, "fp8": 0.05}[kind]


def test_recipe_numbers_and_precedence():
    from mlx_video.pipelines.base import GenerationSettings
    from mlx_video.recipes import all_recipes, apply_recipe
    from mlx_video.registry import get_spec

    spec = get_spec("wan2.2-t2v-a14b")
    s = GenerationSettings(prompt="x", recipe="lightning")
    apply_recipe(s, spec)
    # Wan2.2-Lightning's published training timesteps, and no CFG on either expert
    assert np.allclose(np.array(s.sigmas) * 1000, [1000, 937.5, 833.3333, 625], atol=1e-3)
    assert (s.sampler, s.shift, s.guidance, s.guidance_2) == ("euler", 5.0, 1.0, 1.0)
    s = GenerationSettings(prompt="x", recipe="lightx2v", steps=6, guidance=3.5)
    apply_recipe(s, spec)
    assert s.sigmas is None and s.steps == 6 and s.guidance == 3.5 and s.schedule == "shifted-linear"
    with pytest.raises(MlxVideoError, match="published for"):
        apply_recipe(GenerationSettings(prompt="x", recipe="lightning"), get_spec("wan2.2-ti2v-5b"))
    with pytest.raises(MlxVideoError, match="unknown recipe"):
        apply_recipe(GenerationSettings(prompt="x", recipe="turbo"), spec)
    assert set(all_recipes()) == {"lightning", "lightx2v"}


@pytest.mark.parametrize("mode, group_size, bits", [("mxfp8", 32, 8), ("nvfp4", 16, 4)])
def test_fusing_into_mx_fp_layers_requantizes_in_their_mode(mode, group_size, bits):
    """comfy_quant mxfp8 / nvfp4 layers are kept in MLX's own modes: a LoRA fused into one is re-quantized in
    that mode (not as affine integers), costing one quantization of the fused weight."""
    import mlx.nn as nn

    from mlx_video.lora import _fuse_low_precision
    from mlx_video.nn.linear import dense_weight

    mx.random.seed(3)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=group_size, bits=bits, mode=mode)
    delta = 0.05 * mx.random.normal((32, 64))
    exact = dense_weight(layer, mx.float32) + delta
    _fuse_low_precision(layer, delta)
    assert layer.mode == mode and layer.scales.dtype == mx.uint8
    fused = dense_weight(layer, mx.float32)
    # the error of quantizing the exact fused weight in that mode, computed independently
    codes, scales = mx.quantize(exact, group_size=group_size, bits=bits, mode=mode)
    own = mx.dequantize(codes, scales, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)
    err = float(mx.linalg.norm(fused - exact) / mx.linalg.norm(exact))
    assert err <= 1.01 * float(mx.linalg.norm(own - exact) / mx.linalg.norm(exact)) + 1e-7
