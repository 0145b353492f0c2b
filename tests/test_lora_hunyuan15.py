"""LoRAs for HunyuanVideo 1.5 against diffusers 0.42.1, whose `HunyuanVideo15Transformer3DModel` takes a PEFT adapter
(`load_lora_adapter`, PeftAdapterMixin; the 1.5 pipelines have no LoRA loader of their own).

A tiny random transformer, a random PEFT LoRA on every linear layer and the patch convolution (diffusers names,
lora_A / lora_B, alpha != rank in the `lora_adapter_metadata` header as diffusers writes it), saved as
.safetensors: diffusers' transformer with the adapter loaded at a strength vs ours converted through `mlxvid
convert` with the same file given as `--lora FILE:STRENGTH` (parsed as the CLI does, checked and fused by the
pipeline), at two strengths. The same LoRA in the other namings people hold for 1.5 gives the same per-layer
deltas: the official / ComfyUI names (`diffusion_model.double_blocks.0.img_attn_q`, the refiner's fused
`self_attn_qkv`), musubi-tuner's kohya names (`lora_unet_double_blocks_0_img_attn_q`, musubi-tuner
networks/lora_hv_1_5.py), ComfyUI's fused double-block q|k|v (`double_blocks.0.img_attn_qkv`, the layer its
HunyuanVideo model holds: comfy/lora.py `model_lora_keys_unet`) and ComfyUI's own module names (`img_attn.qkv`,
`img_mod.lin`, `img_mlp.0`, ...), dotted and kohya. The official names are written here from diffusers' (the
test-side table support.hunyuan15.OFFICIAL_NAMES, independent of the converter's key tables)."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.lora import module_deltas, parse_lora_option, read_lora  # noqa: E402
from mlx_video.pipelines.base import Pipeline  # noqa: E402
from support.hunyuan15 import (  # noqa: E402
    GLYPH_DIM, IMAGE_DIM, OFFICIAL_NAMES, TEXT_DIM, save_transformer_folder, tiny_transformer,
)
from support.arrays import rel_err  # noqa: E402

RANK, ALPHA = 3, 5.0

SWAPPED = {"final_layer.adaLN_modulation.1"}
# ComfyUI's fused double-block attention: official img_attn_q / _k / _v as the slices of one img_attn_qkv
COMFY_FUSED = re.compile(r"(double_blocks\.\d+\.(?:img|txt)_attn)_([qkv])")
# official -> ComfyUI's module names (comfy/lora.py's HunyuanVideo list read backwards; the refiner's attention and
# the embedders' MLPs as comfy/ldm/hunyuan_video/model.py names them); 1.5's own embedders keep the official names
COMFY_MODULES = [("_mod.linear", "_mod.lin"), ("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"),
                 ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"), ("self_attn_qkv", "self_attn.qkv"),
                 ("self_attn_proj", "self_attn.proj"), ("t_embedder.mlp.0", "t_embedder.in_layer"),
                 ("t_embedder.mlp.2", "t_embedder.out_layer"), ("c_embedder.linear_1", "c_embedder.in_layer"),
                 ("c_embedder.linear_2", "c_embedder.out_layer"), ("time_in.mlp.0", "time_in.in_layer"),
                 ("time_in.mlp.2", "time_in.out_layer")]


def comfy_module_name(official: str) -> str:
    for theirs, comfy in COMFY_MODULES:
        official = official.replace(theirs, comfy)
    return official


def adapted_layers(model) -> int:
    return sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) for m in model.modules())


def _save(path, tensors: dict, metadata: dict | None = None):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def peft_lora(transformer, path, seed: int) -> dict:
    """A LoRA on every linear layer and the patch convolution of `transformer` in diffusers' PEFT naming, its adapter
    config in the header as diffusers' `save_lora_adapter` writes it (keys under the component's prefix); returns
    the factors {diffusers module: (down, up)}."""
    rng = np.random.default_rng(seed)
    tensors, factors = {}, {}
    for name, module in transformer.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            continue
        w = module.weight
        fan_in = int(np.prod(w.shape[1:]))
        down = (rng.standard_normal((RANK, *w.shape[1:])) / np.sqrt(fan_in)).astype(np.float32)
        up = (rng.standard_normal((w.shape[0], RANK, *[1] * (w.ndim - 2))) * 0.3).astype(np.float32)
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = down, up
        factors[name] = (down, up)
    config = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": sorted(factors)}
    _save(path, tensors, {"lora_adapter_metadata": json.dumps(config)})
    return factors


def _official_name(name: str) -> tuple[str, str | None]:
    """(official module, slice q / k / v of the official fused layer or None) of a diffusers module."""
    for pattern, target in OFFICIAL_NAMES:
        m = re.fullmatch(pattern, name)
        if m:
            official, _, piece = (target(m) if callable(target) else m.expand(target)).partition("#")
            return official, piece or None
    raise KeyError(name)


def _stack(pieces: dict) -> tuple[np.ndarray, np.ndarray]:
    """Slices q, k, v of one fused layer as one LoRA of three times the rank: downs stacked, ups block-diagonal."""
    order = [pieces[p] for p in "qkv"]
    down = np.concatenate([d.reshape(RANK, -1) for d, _ in order])
    rows = [u.shape[0] for _, u in order]
    up = np.zeros((sum(rows), 3 * RANK), dtype=np.float32)
    for i, (_, u) in enumerate(order):
        up[sum(rows[:i]):sum(rows[:i + 1]), i * RANK:(i + 1) * RANK] = u.reshape(rows[i], RANK)
    return down, up


def official_lora(path, factors: dict, prefix: str, dots: bool = True, fuse_double_qkv: bool = False,
                  rename=lambda name: name) -> None:
    """The PEFT factors in the official names, lora_down / lora_up / alpha (alpha / rank = the PEFT file's scale):
    `diffusion_model.` + dotted names (ComfyUI), or `lora_unet_` + underscores (kohya / musubi-tuner). The
    refiner's q/k/v are one fused layer in every official file; `fuse_double_qkv`: the double blocks' too
    (ComfyUI's own `img_attn_qkv`)."""
    groups: dict[str, dict] = {}
    for name, pair in factors.items():
        official, piece = _official_name(name)
        if fuse_double_qkv and COMFY_FUSED.fullmatch(official):
            official, piece = COMFY_FUSED.sub(r"\1_qkv", official), COMFY_FUSED.fullmatch(official).group(2)
        groups.setdefault(official, {})[piece] = pair
    tensors = {}
    for official, pieces in groups.items():
        down, up = pieces[None] if None in pieces else _stack(pieces)
        up = up.reshape(up.shape[0], -1)
        if official in SWAPPED:
            half = up.shape[0] // 2
            up = np.concatenate([up[half:], up[:half]])
        key = prefix + (rename(official) if dots else rename(official).replace(".", "_"))
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = np.array(ALPHA / RANK * down.shape[0], dtype=np.float32)
    _save(path, tensors)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MeanFlow I2V transformer (2 heads of 20, 2 blocks) converted in float32, with its PEFT LoRA and the
    same LoRA in the official namings."""
    root = tmp_path_factory.mktemp("hy15_lora")
    ref = tiny_transformer(2, 20, 2, meanflow=True, seed=8, axes=(4, 8, 8))
    save_transformer_folder(root / "diffusers", ref, pipeline="HunyuanVideo15ImageToVideoPipeline")
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    factors = peft_lora(ref, root / "peft.safetensors", seed=23)
    official_lora(root / "comfy.safetensors", factors, "diffusion_model.")
    official_lora(root / "musubi.safetensors", factors, "lora_unet_", dots=False)
    official_lora(root / "comfy_fused.safetensors", factors, "diffusion_model.", fuse_double_qkv=True)
    official_lora(root / "comfy_modules.safetensors", factors, "diffusion_model.", fuse_double_qkv=True,
                  rename=comfy_module_name)
    official_lora(root / "comfy_modules_kohya.safetensors", factors, "lora_unet_", dots=False, fuse_double_qkv=True,
                  rename=comfy_module_name)
    return root, ref


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, 2, 3, 5, generator=g)
    text, glyph = torch.randn(2, 7, TEXT_DIM, generator=g), torch.randn(2, 4, GLYPH_DIM, generator=g)
    text_mask = torch.stack([(torch.arange(7) < n).long() for n in (7, 4)])
    glyph_mask = torch.stack([(torch.arange(4) < n).long() for n in (2, 0)])
    features = torch.randn(2, 5, IMAGE_DIM, generator=g)
    return x, torch.tensor([873.0, 873.0]), text, text_mask, glyph * glyph_mask[..., None], glyph_mask, features, \
        torch.tensor([512.5, 512.5])


def _reference(model, inputs) -> np.ndarray:
    x, t, text, tm, glyph, gm, features, r = inputs
    with torch.no_grad():
        return model(x, t, text, tm, timestep_r=r, encoder_hidden_states_2=glyph, encoder_attention_mask_2=gm,
                     image_embeds=features).sample.numpy()


def _ours(pipe, option: str, inputs) -> np.ndarray:
    """The converted model with `--lora option` as the pipeline takes it: checked (resolve_loras), fused at load."""
    pipe._run_loras = pipe.resolve_loras([parse_lora_option(option)])
    model = pipe.load_transformer()
    x, t, text, tm, glyph, gm, features, r = (mx.array(a.numpy()) for a in inputs)
    got = model(x.transpose(0, 2, 3, 4, 1), t, text, tm, glyph, gm, features, r)
    return np.array(got).transpose(0, 4, 1, 2, 3)


@pytest.mark.parametrize("strength", [0.7, -1.3])
def test_peft_lora_matches_diffusers_adapter(tiny, strength):
    """diffusers `load_lora_adapter` + `set_adapters(weights=[strength])` against ours with `--lora FILE:strength`."""
    root, ref = tiny
    inputs = _inputs(3)
    base = _reference(ref, inputs)
    adapted = copy.deepcopy(ref)
    adapted.load_lora_adapter(str(root), weight_name="peft.safetensors", adapter_name="style", prefix="transformer")
    adapted.set_adapters(["style"], weights=[strength])
    want = _reference(adapted, inputs)
    effect = rel_err(base, want)
    assert effect > 0.05  # the LoRA matters

    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    got = _ours(pipe, f"{root / 'peft.safetensors'}:{strength}", inputs)
    err = rel_err(got, want)
    print(f"HunyuanVideo 1.5 PEFT LoRA at strength {strength}: rel {err:.2e} against diffusers (it moves the output "
          f"by {effect:.2f})")
    assert err < 1e-4
    (record,) = pipe._run_loras
    assert (record["scale"], record["format"], record["modules"]) == (strength, "peft", adapted_layers(ref))


@pytest.mark.parametrize("naming", ["comfy", "musubi", "comfy_fused", "comfy_modules", "comfy_modules_kohya"])
def test_official_namings_fuse_the_same_deltas(tiny, naming):
    """The official / ComfyUI, musubi (kohya) and ComfyUI fused-q|k|v files of the same LoRA give our layers the
    PEFT file's deltas (the refiner's fused q|k|v from three diffusers slices; the double blocks' q, k, v from one
    ComfyUI fused layer)."""
    root, ref = tiny
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    maps, parts = pipe.lora_keymaps(), pipe.lora_parts("transformer")
    deltas = {name: module_deltas([(read_lora(root / f"{name}.safetensors", maps, splits=pipe.lora_splits()), 0.8)],
                                  parts) for name in ("peft", naming)}
    assert set(deltas["peft"]) == set(deltas[naming]) and len(deltas["peft"]) == adapted_layers(ref) - 4  # 2 refiner q|k|v
    for target, delta in deltas["peft"].items():
        a, b = np.array(delta["weight"]), np.array(deltas[naming][target]["weight"])
        assert rel_err(b, a) < 1e-6, target
    pipe.resolve_loras([{"path": str(root / f"{naming}.safetensors"), "scale": 0.8}])


BAD = {
    # a Wan LoRA, a HunyuanVideo (1.0) single-stream layer, the full-size width on the tiny model
    "other_family": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": (4, 40),
                      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": (40, 4)}, "not a layer of this model", 0),
    "hunyuan_1_0": ({"diffusion_model.single_blocks.0.linear1.lora_down.weight": (4, 40),
                     "diffusion_model.single_blocks.0.linear1.lora_up.weight": (200, 4)}, "not a layer of this model", 0),
    "other_width": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 2048),
                     "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (2048, 4)}, "2048", 0),
    "fused_not_thirds": ({"diffusion_model.double_blocks.1.img_attn_qkv.lora_down.weight": (4, 40),
                          "diffusion_model.double_blocks.1.img_attn_qkv.lora_up.weight": (100, 4)}, "do not split", 1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_files_are_refused_by_key(tiny, case):
    root, _ = tiny
    shapes, words, index = BAD[case]
    path = _save(root / f"bad_{case}.safetensors", {k: np.zeros(s) for k, s in shapes.items()})
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    with pytest.raises(MlxVideoError) as e:
        pipe.resolve_loras([{"path": str(path), "scale": 1.0}])
    assert path.name in str(e.value) and sorted(shapes)[index] in str(e.value) and words in str(e.value), str(e.value)
