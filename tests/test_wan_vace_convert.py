"""Wan VACE checkpoints at full size, header only (the real names and shapes from diffusers'
`WanVACETransformer3DModel` on torch's meta device; see tests/test_convert_fullsize.py): Wan2.1-VACE-1.3B and
14B in diffusers names and as ComfyUI / official single files (`model.diffusion_model.` + official names), each
planned by the converter onto `WanVACETransformer` with every key mapped and every shape matching, and the model
recognised from its shapes. The official names used here are checked against diffusers' own official-to-diffusers
renaming (`convert_wan_transformer_to_diffusers`), so they are not our key table read backwards."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mlx_video.convert.convert import plan  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from support.tensor_files import meta_state, write_description  # noqa: E402
from support.wan_checkpoints import WAN, official_transformer_name, umt5_file, vae_file  # noqa: E402
from support.wan import train_spiece  # noqa: E402

VACE = {
    "wan2.1-vace-1.3b": dict(WAN, num_attention_heads=12, in_channels=16, out_channels=16, ffn_dim=8960, num_layers=30,
                             vace_layers=list(range(0, 30, 2)), vace_in_channels=96),
    "wan2.1-vace-14b": dict(WAN, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824,
                            num_layers=40, vace_layers=list(range(0, 40, 5)), vace_in_channels=96),
}
VACE["wan2.2-vace-fun-a14b"] = VACE["wan2.1-vace-14b"]  # two such experts (alibaba-pai/Wan2.2-VACE-Fun-A14B)


def official_vace_name(key: str) -> str:
    """A diffusers VACE transformer key in the official / ComfyUI names."""
    if key.startswith("vace_patch_embedding."):
        return key
    if key.startswith("vace_blocks."):
        index, rest = key[len("vace_blocks."):].split(".", 1)
        if rest.startswith(("proj_in.", "proj_out.")):
            name, tail = rest.split(".", 1)
            return f"vace_blocks.{index}.{ {'proj_in': 'before_proj', 'proj_out': 'after_proj'}[name] }.{tail}"
        return "vace_" + official_transformer_name(f"blocks.{index}.{rest}")
    return official_transformer_name(key)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vace-fullsize")
    (root / "tok").mkdir()
    train_spiece(root / "tok" / "spiece.model")
    return root


def vace_file(path, model_id: str, fmt: str):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = meta_state(WanVACETransformer3DModel, **VACE[model_id])
    if fmt == "diffusers":
        return write_description(path, {k: ("BF16", tuple(v.shape), None) for k, v in sd.items()})
    official = {"model.diffusion_model." + official_vace_name(k): v for k, v in sd.items()}
    back = convert_wan_transformer_to_diffusers(dict(official))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    return write_description(path, {k: ("F16", tuple(v.shape), None) for k, v in official.items()})


@pytest.mark.parametrize("model_id, fmt", [("wan2.1-vace-1.3b", "comfy"), ("wan2.1-vace-14b", "comfy"),
                                           ("wan2.1-vace-1.3b", "diffusers"), ("wan2.2-vace-fun-a14b", "comfy")])
def test_vace_full_size_files(files, model_id, fmt):
    transformer = vace_file(files / f"{model_id}-{fmt}.safetensors", model_id, fmt)
    second = {"transformer_2": transformer} if model_id == "wan2.2-vace-fun-a14b" else {}
    conversion = plan(None, components={"transformer": transformer, **second,
                                        "text_encoder": umt5_file(files / "umt5.safetensors", "official"),
                                        "vae": vae_file(files / "vae21.safetensors", "2.1")},
                      tokenizer=files / "tok" / "spiece.model")  # fmt: skip
    config = VACE[model_id]
    layers, context = config["num_layers"], len(config["vace_layers"])
    counts = {c.name: len(c.tensors) for c in conversion.components}
    # the Wan blocks (27 tensors each) and 15 outside them; each context block 27 + its hint projection (2),
    # block 0's input projection (2), the conditioning's patch embedding (2)
    assert counts["transformer"] == layers * 27 + 15 + context * 29 + 2 + 2
    assert conversion.manifest["model"] == model_id
    transformer_config = next(c for c in conversion.components if c.name == "transformer").config
    assert list(transformer_config["vace_layers"]) == config["vace_layers"]  # spread evenly: no config.json here
    assert transformer_config["vace_in_channels"] == 96
    # --quantize stores the context blocks' layers in low precision too (the module swaps exactly those it lists)
    from mlx_video.convert.quantize import is_low_precision

    plan_ = next(c for c in conversion.components if c.name == "transformer")
    low = {k for k, (_, shape, _) in plan_.tensors.items()
           if is_low_precision("transformer", k, shape, "q8", 64, plan_.low_precision)}
    assert len(low) == (layers + context) * 10 and "vace_blocks.1.ffn.fc2.weight" in low


def test_plain_wan_file_is_not_taken_for_vace(files):
    """A Wan 2.1 T2V-14B-sized file without context blocks is not wan2.1-vace-14b (the sizes match)."""
    from support.wan_checkpoints import transformer_file

    path = files / "plain-14b.safetensors"
    transformer_file(path, "wan2.2-t2v-a14b", "official_bf16")
    with pytest.raises(MlxVideoError, match="matches no registry model|needs two"):
        plan(None, components={"transformer": path,
                               "text_encoder": umt5_file(files / "umt5.safetensors", "official"),
                               "vae": vae_file(files / "vae21.safetensors", "2.1")},
             tokenizer=files / "tok" / "spiece.model")  # fmt: skip


def official_config(model_id: str) -> dict:
    """config.json as the official release writes it: `VaceWanModel`'s arguments (Wan-Video/Wan2.1
    wan/modules/vace_model.py: the WanModel ones, model_type "vace", vace_layers, vace_in_dim)."""
    c = VACE[model_id]
    return {"_class_name": "VaceWanModel", "model_type": "vace", "dim": c["num_attention_heads"] * 128,
            "ffn_dim": c["ffn_dim"], "freq_dim": 256, "num_heads": c["num_attention_heads"],
            "num_layers": c["num_layers"], "in_dim": 16, "out_dim": 16, "text_len": 512, "eps": 1e-6,
            "vace_layers": c["vace_layers"], "vace_in_dim": 96}


def official_shards(folder, model_id: str, layers=None):
    """The transformer as the release shards it (two files), its config.json beside them."""
    from diffusers import WanVACETransformer3DModel

    folder.mkdir(parents=True)
    config = dict(VACE[model_id], **({"vace_layers": layers} if layers else {}))
    sd = {official_vace_name(k): tuple(v.shape) for k, v in meta_state(WanVACETransformer3DModel, **config).items()}
    names = sorted(sd)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        write_description(folder / f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors",
                          {k: ("BF16", sd[k], None) for k in part})
    (folder / "config.json").write_text(json.dumps(dict(official_config(model_id), **({"vace_layers": layers} if layers else {}))))


@pytest.mark.parametrize("model_id", ["wan2.1-vace-14b", "wan2.2-vace-fun-a14b"])
def test_vace_official_release_layout(files, model_id):
    """Wan2.1-VACE-14B as its release lays it out (the shards and config.json in the folder), and
    Wan2.2-VACE-Fun-A14B's high_noise_model/ + low_noise_model/; here with vace_layers other than the even
    spread, which only config.json can tell."""
    src = files / model_id
    layers = [0, 3, 7, 12, 18, 25, 31, 39]
    if model_id == "wan2.2-vace-fun-a14b":
        official_shards(src / "high_noise_model", model_id, layers)
        official_shards(src / "low_noise_model", model_id, layers)
    else:
        official_shards(src, model_id, layers)
    (src / "google" / "umt5-xxl").mkdir(parents=True)
    (src / "google" / "umt5-xxl" / "spiece.model").write_bytes((files / "tok" / "spiece.model").read_bytes())
    conversion = plan(src, components={"text_encoder": umt5_file(files / "umt5.safetensors", "official"),
                                       "vae": vae_file(files / "vae21.safetensors", "2.1")})
    assert conversion.manifest["model"] == model_id and conversion.manifest["task"] == "vace"
    experts = [c for c in conversion.components if c.name.startswith("transformer")]
    assert len(experts) == (2 if model_id == "wan2.2-vace-fun-a14b" else 1)
    for c in experts:
        assert list(c.config["vace_layers"]) == layers and len(c.tensors) == 40 * 27 + 15 + 8 * 29 + 4


def test_cost_model_counts_the_context_blocks():
    """The memory preflight's parameter formula includes the context branch: equal to our module's count (built
    lazily, nothing allocated) for Wan2.1-VACE-1.3B cut to 4 blocks, and to diffusers' full 1.3B / 14B models."""
    from dataclasses import replace

    from diffusers import WanVACETransformer3DModel
    from mlx.utils import tree_flatten

    from mlx_video.families.wan import cost_model
    from mlx_video.families.wan.vace_model import WAN21_VACE_1_3B, WanVACETransformer
    from mlx_video.registry import MODELS

    def formula(cfg):
        return sum(c.total for c in cost_model.transformer_params(cfg).values())

    small = replace(WAN21_VACE_1_3B, num_layers=4, vace_layers=(0, 2))
    assert formula(small) == sum(v.size for _, v in tree_flatten(WanVACETransformer(small).parameters()))
    for model_id in ("wan2.1-vace-1.3b", "wan2.1-vace-14b"):
        reference = sum(v.numel() for v in meta_state(WanVACETransformer3DModel, **VACE[model_id]).values())
        assert formula(MODELS[model_id].transformer) == reference
