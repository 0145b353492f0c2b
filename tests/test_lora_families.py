"""LoRAs for HunyuanVideo and Mochi: parity with diffusers' `load_lora_weights` on tiny random pipelines, a few
steps from the same starting latents, for a diffusers/PEFT file (written by diffusers' own `save_lora_weights`)
and the same LoRA in the official / ComfyUI naming (fused q|k|v, `diffusion_model.` prefix, lora_down/lora_up/
alpha); kohya naming at the key level; the errors for bad input.

diffusers' loaders take the PEFT naming for both families. Its converter for HunyuanVideo's original naming
(`_convert_hunyuan_video_lora_to_diffusers`) hard-codes the full model's hidden size 3072 for the single-stream
blocks, so it cannot load a tiny model's file, and Mochi has none: the official-naming file is written here from
the PEFT one (its own test-side naming, independent of our key tables) and compared against diffusers running
the PEFT file."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from mlx_video.cli import main  # noqa: E402
from mlx_video.families import FAMILIES, pipeline_class  # noqa: E402
from mlx_video.pipelines.base import Pipeline  # noqa: E402
from support.hunyuan import build_tiny_hunyuan_pipeline  # noqa: E402
from support.mochi import build_tiny_mochi_pipeline  # noqa: E402
from support.tensor_files import save_f32  # noqa: E402
from support.arrays import rel_err  # noqa: E402

# every registered family but those with their own LoRA tests (Wan: tests/test_lora.py and tests/test_cache.py;
# HunyuanVideo 1.5: tests/test_lora_hunyuan15.py); a new family fails here (no tiny model or run of it below)
# until it has one, or until it refuses LoRAs: a family whose pipeline has no LoRA key tables is checked for the
# refusal instead (test_refusing_families_say_so)
OWN_TESTS = ("wan", "hunyuan15")
OTHER_FAMILIES = [name for name in FAMILIES if name not in OWN_TESTS and pipeline_class(name).lora_keymaps
                  is not Pipeline.lora_keymaps]
REFUSING_FAMILIES = [name for name in FAMILIES if pipeline_class(name).lora_keymaps is Pipeline.lora_keymaps]
PROMPT = "a corgi surfs a wave at sunset, cinematic"
NEGATIVE = "static, blurry, low quality"
RANK, ALPHA = 3, 5.0


# ---- the official naming, written from diffusers' module names (the published names of each release) ----

# diffusers module -> (official module, slice of a fused layer, number of slices); swapped: output halves the other way
HUNYUAN_OFFICIAL = [
    (r"x_embedder\.proj", "img_in.proj"),
    (r"context_embedder\.proj_in", "txt_in.input_embedder"),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_1", "txt_in.t_embedder.mlp.0"),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_2", "txt_in.t_embedder.mlp.2"),
    (r"context_embedder\.time_text_embed\.text_embedder\.linear_(\d)", r"txt_in.c_embedder.linear_\1"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_([qkv])",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_qkv#\2"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0",
     r"txt_in.individual_token_refiner.blocks.\1.self_attn_proj"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0\.proj",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc1"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2",
     r"txt_in.individual_token_refiner.blocks.\1.mlp.fc2"),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear",
     r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1"),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.mlp.0"),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.mlp.2"),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.mlp.0"),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.mlp.2"),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.linear"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.linear"),
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", r"double_blocks.\1.img_attn_qkv#\2"),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", r"double_blocks.\1.txt_attn_qkv#\2"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn_proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn_proj"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.fc2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.fc1"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.fc2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", r"single_blocks.\1.linear1#\2"),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", r"single_blocks.\1.linear1#mlp"),
    (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2"),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.linear"),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),  # official (shift, scale), diffusers (scale, shift)
    (r"proj_out", "final_layer.linear"),
]
HUNYUAN_SWAPPED = {"final_layer.adaLN_modulation.1"}

MOCHI_OFFICIAL = [
    (r"patch_embed\.proj", "x_embedder.proj"),
    (r"time_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0"),
    (r"time_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2"),
    (r"time_embed\.pooler\.(to_kv|to_q|to_out)", r"t5_y_embedder.\1"),
    (r"time_embed\.caption_proj", "t5_yproj"),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"blocks.\1.mod_x"),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear(?:_1)?", r"blocks.\1.mod_y"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])", r"blocks.\1.attn.qkv_x#\2"),
    (r"transformer_blocks\.(\d+)\.attn1\.add_([qkv])_proj", r"blocks.\1.attn.qkv_y#\2"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.attn.proj_x"),
    (r"transformer_blocks\.(\d+)\.attn1\.to_add_out", r"blocks.\1.attn.proj_y"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"blocks.\1.mlp_x.w1"),  # official [gate | proj]
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"blocks.\1.mlp_x.w2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"blocks.\1.mlp_y.w1"),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"blocks.\1.mlp_y.w2"),
    (r"norm_out\.linear", "final_layer.mod"),  # official (shift, scale)
    (r"proj_out", "final_layer.linear"),
]
MOCHI_SWAPPED = re.compile(r"blocks\.\d+\.mlp_[xy]\.w1|final_layer\.mod")
SLICE_ORDER = {"q": 0, "k": 1, "v": 2, "mlp": 3}


def _official_name(name: str, table) -> tuple[str, int | None]:
    for pattern, target in table:
        if re.fullmatch(pattern, name):
            official, _, piece = re.sub(rf"^{pattern}$", target, name).partition("#")
            return official, (SLICE_ORDER[piece] if piece else None)
    raise KeyError(name)


def official_lora(path, factors: dict, table, swapped) -> None:
    """The PEFT factors {diffusers module: (down, up)} as one ComfyUI-style file: a fused layer's slices become
    one LoRA of the summed rank (downs stacked, ups block-diagonal), alpha keeps lora_alpha / r per module."""
    groups: dict[str, dict[int | None, tuple]] = {}
    for name, pair in factors.items():
        official, piece = _official_name(name, table)
        groups.setdefault(official, {})[piece] = pair
    tensors = {}
    for official, pieces in groups.items():
        if None in pieces:
            down, up = pieces[None]
        else:
            order = sorted(pieces)
            assert order == list(range(len(order))), (official, order)
            down = np.concatenate([pieces[i][0] for i in order])
            rows = [pieces[i][1].shape[0] for i in order]
            up = np.zeros((sum(rows), down.shape[0]), dtype=np.float32)
            r0 = c0 = 0
            for i, n in zip(order, rows):
                up[r0:r0 + n, c0:c0 + RANK] = pieces[i][1].reshape(n, RANK)
                r0, c0 = r0 + n, c0 + RANK
        if (official in swapped) if isinstance(swapped, set) else swapped.fullmatch(official):
            half = up.shape[0] // 2
            up = np.concatenate([up[half:], up[:half]])
        key = f"diffusion_model.{official}"
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = np.array(ALPHA / RANK * down.shape[0], dtype=np.float32)
    save_f32(path, tensors)


def peft_lora(pipe_cls, transformer, path, seed: int) -> dict:
    """A LoRA on every linear (and the patch convolution) of `transformer`, saved by diffusers'
    `save_lora_weights` with its adapter config (alpha != rank) in the header; returns the factors."""
    rng = np.random.default_rng(seed)
    layers, factors = {}, {}
    for name, module in transformer.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            continue
        w = module.weight
        fan_in = int(np.prod(w.shape[1:]))
        down = (rng.standard_normal((RANK, *w.shape[1:])) / np.sqrt(fan_in)).astype(np.float32)
        up = (rng.standard_normal((w.shape[0], RANK, *[1] * (w.ndim - 2))) * 0.3).astype(np.float32)
        layers[f"{name}.lora_A.weight"] = torch.from_numpy(down)
        layers[f"{name}.lora_B.weight"] = torch.from_numpy(up)
        factors[name] = (down, up)
    meta = {"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(factors)}
    pipe_cls.save_lora_weights(str(path.parent), transformer_lora_layers=layers,
                               transformer_lora_adapter_metadata=meta, weight_name=path.name)
    return factors


# ---- the tiny pipelines, converted, with their LoRA files ----


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    from diffusers import HunyuanVideoPipeline

    root = tmp_path_factory.mktemp("hunyuan_lora")
    pipe = build_tiny_hunyuan_pipeline(root / "diffusers", seed=5)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    factors = peft_lora(HunyuanVideoPipeline, pipe.transformer, root / "hy_peft.safetensors", seed=21)
    official_lora(root / "hy_comfy.safetensors", factors, HUNYUAN_OFFICIAL, HUNYUAN_SWAPPED)
    return root, pipe


@pytest.fixture(scope="module")
def mochi(tmp_path_factory):
    from diffusers import MochiPipeline

    root = tmp_path_factory.mktemp("mochi_lora")
    pipe = build_tiny_mochi_pipeline(root / "diffusers", seed=6)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    factors = peft_lora(MochiPipeline, pipe.transformer, root / "mochi_peft.safetensors", seed=22)
    official_lora(root / "mochi_comfy.safetensors", factors, MOCHI_OFFICIAL, MOCHI_SWAPPED)
    return root, pipe


def _reference_hunyuan(pipe, init, steps):
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1].numpy()  # the official grid
    with torch.no_grad():
        return pipe(prompt=PROMPT, height=32, width=48, num_frames=9, num_inference_steps=steps, guidance_scale=6.0,
                    latents=torch.from_numpy(init), output_type="latent", sigmas=sigmas,
                    max_sequence_length=256).frames.numpy()


def _reference_mochi(pipe, init, steps):
    with torch.no_grad():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=7,
                    num_inference_steps=steps, guidance_scale=4.5, latents=torch.from_numpy(init), output_type="latent",
                    max_sequence_length=256).frames.numpy()


def _ours(root, tag, init, steps, extra):
    np.save(root / f"init_{tag}.npy", init)
    out = root / f"out_{tag}.npy"
    frames, guidance = ("9", "6.0") if root.name.startswith("hunyuan") else ("7", "4.5")
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--size", "48x32",
          "--frames", frames, "--steps", str(steps), "--guidance", guidance, "--init-latents",
          str(root / f"init_{tag}.npy"), "--save-latents", str(out), "--quiet", "--overwrite", *extra])
    return np.load(out), json.loads(out.with_suffix(".json").read_text())["settings"]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_lora_parity_with_diffusers(family, request):
    """diffusers loads the PEFT file with load_lora_weights at strength 0.7 (set_adapters); ours fuses the PEFT
    file, then the official-naming file, at the same strength: the same latents after a few steps."""
    root, pipe = request.getfixturevalue(family)
    steps, strength = 3, 0.7
    reference = _reference_hunyuan if family == "hunyuan" else _reference_mochi
    shape = (1, 6, 3, 4, 6) if family == "hunyuan" else (1, 12, 2, 4, 6)
    init = np.random.default_rng(31).standard_normal(shape).astype(np.float32)
    peft, comfy = (root / f"{'hy' if family == 'hunyuan' else 'mochi'}_{kind}.safetensors" for kind in ("peft", "comfy"))

    ref_pipe = copy.deepcopy(pipe)
    base = reference(ref_pipe, init, steps)
    ref_pipe.load_lora_weights(str(peft), adapter_name="style")
    ref_pipe.transformer.set_adapters(["style"], weights=[strength])
    ref = reference(ref_pipe, init, steps)
    effect = rel_err(base, ref)
    assert effect > 0.05  # the LoRA matters

    for path, fmt in ((peft, "peft"), (comfy, "comfy")):
        ours, settings = _ours(root, f"lora_{fmt}", init, steps, ["--lora", f"{path}:{strength}"])
        err = rel_err(ours, ref)
        print(f"{family} LoRA ({fmt} naming, strength {strength}) vs diffusers load_lora_weights: relative error "
              f"{err:.2e}; the LoRA moves the result by {effect:.2f}")
        assert err < 1e-3
        (record,) = settings["loras"]
        assert (record["name"], record["scale"], record["target"], record["format"]) == (path.name, strength, "all", fmt)
        import hashlib

        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_namings_fuse_the_same_deltas(family, request, tmp_path):
    """The PEFT, ComfyUI and kohya namings of one LoRA give the same per-layer deltas on our model (a fused q|k|v
    from three slices equals the one fused layer of the official file)."""
    import mlx.core as mx

    from mlx_video.lora import module_deltas, read_lora
    from mlx_video.pipelines.base import Pipeline

    root, _ = request.getfixturevalue(family)
    stem = "hy" if family == "hunyuan" else "mochi"
    comfy = root / f"{stem}_comfy.safetensors"
    kohya = tmp_path / "kohya.safetensors"
    renamed = {}
    for key, value in mx.load(str(comfy)).items():
        module, suffix = re.fullmatch(r"diffusion_model\.(.+?)(\.lora_down\.weight|\.lora_up\.weight|\.alpha)", key).groups()
        renamed["lora_unet_" + module.replace(".", "_") + suffix] = np.array(value)
    save_f32(kohya, renamed)
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    maps, parts = pipe.lora_keymaps(), pipe.lora_parts("transformer")
    deltas = {name: module_deltas([(read_lora(path, maps), 1.0)], parts)
              for name, path in (("peft", root / f"{stem}_peft.safetensors"), ("comfy", comfy), ("kohya", kohya))}
    assert set(deltas["peft"]) == set(deltas["comfy"]) == set(deltas["kohya"])
    fused_layers = [k for k in deltas["peft"] if k in parts]
    assert fused_layers  # some layers were filled slice by slice
    for target in deltas["peft"]:
        a, b, c = (np.array(deltas[n][target]["weight"]) for n in ("peft", "comfy", "kohya"))
        assert np.array_equal(b, c)
        assert rel_err(a, b) < 1e-6, target


# ---- bad input: clear errors naming the file and the key, before any denoising step ----


def _error(root, extra, capsys):
    frames = "9" if root.name.startswith("hunyuan") else "7"
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--frames", frames,
              "--steps", "2", "--save-latents", str(root / "never.npy"), "--quiet", "--overwrite", *extra])
    assert not (root / "never.npy").exists()
    return capsys.readouterr().err


BAD = {
    # a Wan LoRA on HunyuanVideo, a HunyuanVideo LoRA on Mochi
    "other_family": {
        "hunyuan": {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 48),
                    "diffusion_model.blocks.0.self_attn.q.lora_up.weight": (48, 4)},
        "mochi": {"diffusion_model.double_blocks.0.img_attn_qkv.lora_down.weight": (4, 60),
                  "diffusion_model.double_blocks.0.img_attn_qkv.lora_up.weight": (180, 4)},
    },
    # the full-size width on the tiny model (a diffusers q slice of the fused q|k|v)
    "other_width": {
        "hunyuan": {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
                    "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4)},
        "mochi": {"transformer.transformer_blocks.0.attn1.to_k.lora_A.weight": (4, 3072),
                  "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight": (3072, 4)},
    },
    "rank_mismatch": {
        "hunyuan": {"diffusion_model.single_blocks.1.linear1.lora_down.weight": (4, 48),
                    "diffusion_model.single_blocks.1.linear1.lora_up.weight": (288, 8)},
        "mochi": {"diffusion_model.blocks.1.attn.qkv_y.lora_down.weight": (4, 36),
                  "diffusion_model.blocks.1.attn.qkv_y.lora_up.weight": (180, 8)},
    },
    "no_lora_keys": {
        "hunyuan": {"double_blocks.0.img_attn_qkv.weight": (144, 48)},
        "mochi": {"blocks.0.attn.qkv_x.weight": (180, 60)},
    },
}
EXPECT = {"other_family": ("not a layer of this model", 0), "other_width": ("3072", 0),
          "rank_mismatch": ("rank mismatch", 1), "no_lora_keys": ("not LoRA tensors", 0)}


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_files(family, case, request, capsys, no_denoising):
    root, _ = request.getfixturevalue(family)
    path = save_f32(root / f"bad_{case}.safetensors", {k: np.zeros(s) for k, s in BAD[case][family].items()})
    err = _error(root, ["--lora", str(path)], capsys)
    words, key_index = EXPECT[case]
    key = sorted(BAD[case][family])[key_index]
    assert path.name in err and key in err and words in err, err


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@pytest.mark.parametrize("option", ["--lora-high", "--lora-low"])
def test_expert_options_refused_for_single_models(family, option, request, capsys, no_denoising):
    root, _ = request.getfixturevalue(family)
    err = _error(root, [option, str(root / ("hy_peft.safetensors" if family == "hunyuan" else "mochi_peft.safetensors"))],
                 capsys)
    assert option in err and "two experts" in err and "--lora" in err


# ---- unit level: slices of fused layers, dense and quantized ----


@pytest.mark.parametrize("bits", [8, 4])
def test_slices_fuse_into_dense_and_quantized_fused_layers(tmp_path, bits):
    """diffusers-named LoRAs on some slices of fused layers (k and mlp of a single-stream block's q|k|v|mlp
    `linear1`, v of a double-stream block's text q|k|v): the dense fused weight is W + the deltas at those rows
    (offsets written out here); the q8/q4 one re-quantizes it once: an error the size of the conversion's own."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_video.lora import check_lora, fuse_loras, read_lora
    from mlx_video.families.hunyuan.config import HunyuanTransformerConfig
    from mlx_video.families.hunyuan.transformer import HunyuanTransformer
    from mlx_video.nn.linear import dense_weight
    from mlx_video.families.hunyuan.keys import DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER
    from mlx_video.families.hunyuan.pipeline import fused_slices

    cfg = HunyuanTransformerConfig(num_heads=2, head_dim=32, mlp_ratio=2.0, num_double_blocks=1, num_single_blocks=1,
                                   num_refiner_blocks=1, rope_axes=(8, 12, 12), in_channels=4, out_channels=4,
                                   text_dim=64, pooled_dim=64)
    dim, mlp = 64, 128
    dense = HunyuanTransformer(cfg, dtype=mx.float32)
    mx.eval(dense.parameters())
    quant = HunyuanTransformer(cfg, dtype=mx.float32)
    quant.update(dense.parameters())
    targets = {"single_blocks.0.linear1", "double_blocks.0.txt.attn_qkv"}
    nn.quantize(quant, group_size=64, bits=bits, class_predicate=lambda path, m: path in targets)
    rng = np.random.default_rng(bits)
    modules = {"single_transformer_blocks.0.attn.to_k": (dim, dim), "single_transformer_blocks.0.proj_mlp": (mlp, dim),
               "transformer_blocks.0.attn.add_v_proj": (dim, dim)}
    tensors, factors = {}, {}
    for name, (o, i) in modules.items():
        down, up = rng.standard_normal((4, i)) / np.sqrt(i), rng.standard_normal((o, 4)) * 0.2
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
        factors[name] = (down, up)
    path = save_f32(tmp_path / "slices.safetensors", tensors)
    lora = read_lora(path, [DIFFUSERS_TRANSFORMER, OFFICIAL_TRANSFORMER])
    parts = fused_slices(cfg)

    check_lora(lora, {k: tuple(v.shape) for k, v in tree_flatten(dense.parameters())}, "the tiny model", parts)

    def delta(name, rows, total):
        d = np.zeros((total, dim), dtype=np.float32)
        down, up = factors[name]
        d[rows[0]:rows[1]] = 0.6 * (up @ down)  # strength 0.6, scale 1 (no alpha, no header)
        return d

    expected = {
        "single_blocks.0.linear1": delta("single_transformer_blocks.0.attn.to_k", (dim, 2 * dim), 3 * dim + mlp)
        + delta("single_transformer_blocks.0.proj_mlp", (3 * dim, 3 * dim + mlp), 3 * dim + mlp),
        "double_blocks.0.txt.attn_qkv": delta("transformer_blocks.0.attn.add_v_proj", (2 * dim, 3 * dim), 3 * dim),
    }
    before = {t: np.array(dense_weight(dict(dense.named_modules())[t], mx.float32)) for t in targets}
    stored = {t: np.array(dense_weight(dict(quant.named_modules())[t], mx.float32)) for t in targets}
    assert fuse_loras(dense, [(lora, 0.6)], parts) == 2
    assert fuse_loras(quant, [(lora, 0.6)], parts) == 2
    for target in targets:
        exact = before[target] + expected[target]
        fused = np.array(dense_weight(dict(dense.named_modules())[target], mx.float32))
        assert rel_err(fused, exact) < 1e-6
        layer = dict(quant.named_modules())[target]
        assert isinstance(layer, nn.QuantizedLinear)
        err, own = rel_err(np.array(dense_weight(layer, mx.float32)), exact), rel_err(stored[target], before[target])
        print(f"q{bits} {target}: fused weight error {err:.2e} (the conversion's own {own:.2e})")
        assert err < 2.0 * own and err < {8: 0.01, 4: 0.15}[bits]


# every family takes LoRAs today: a stand-in family (HunyuanVideo 1.5's pipeline with its LoRA tables taken away)
# keeps the refusal checked
STAND_IN = type("NoLoraPipeline", (pipeline_class("hunyuan15"),), {"lora_keymaps": Pipeline.lora_keymaps})


@pytest.mark.parametrize("family", [*REFUSING_FAMILIES, "stand-in"])
def test_refusing_families_say_so(family, tmp_path):
    """A family without LoRA support refuses --lora by name before any weights are read."""
    from types import SimpleNamespace

    from mlx_video.errors import MlxVideoError
    from mlx_video.registry import MODELS

    cls = STAND_IN if family == "stand-in" else pipeline_class(family)
    spec = next(s for s in MODELS.values() if s.family == (family if family != "stand-in" else "hunyuan15"))
    pipe = object.__new__(cls)
    pipe.spec, pipe._lora_cache, pipe._lora_shapes = spec, {}, {}
    pipe.folder = SimpleNamespace(path=tmp_path)
    with pytest.raises(MlxVideoError, match=f"{spec.id}: LoRAs are not supported for the {spec.family} family"):
        pipe.resolve_loras([{"path": str(tmp_path / "x.safetensors"), "scale": 1.0}])
