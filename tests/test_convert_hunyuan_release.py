"""The official HunyuanVideo release layout (tencent/HunyuanVideo downloaded into `ckpts/`, with the text encoders
its README has you add) converted by `mlxvid convert ckpts DST`, in its real file names and formats, built from a
tiny random diffusers pipeline: the full-precision transformer (`mp_rank_00_model_states.pt`, under "module"), the
fp8 variant with its per-layer scale map, the VAE's `pytorch_model.pt` with the release's config.json, the LLaVA
language model as a transformers Llama folder, and CLIP-L as a whole CLIPModel folder (vision tower included)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from mlx_video.families.hunyuan import planner as family  # noqa: E402
from mlx_video.convert.formats import TensorFile  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from support.arrays import rel_err  # noqa: E402
from support.hunyuan import build_tiny_hunyuan_pipeline, official_state, official_vae_config  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset, cinematic"
E4M3_MAX = 448.0


def fp8_release(official: dict) -> tuple[dict, dict, dict]:
    """(fp8 state, scale map, the weights they decode to): every linear layer of the double- and single-stream
    blocks as e4m3fn codes of W / scale with scale = max|W| / 448, the map keyed by module name."""
    state, scales, decoded = {}, {}, {}
    for key, value in official.items():
        if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().float() / E4M3_MAX
            codes = (value.float() / scale).to(torch.float8_e4m3fn)
            state[key], scales[key[: -len(".weight")]] = codes, scale.reshape(())
            decoded[key] = codes.float() * scale
        else:
            state[key] = decoded[key] = value
    return state, scales, decoded


def write_release(root, pipe, transformer_files: dict) -> None:
    from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

    transformers_dir = root / family.RELEASE_MODEL / "transformers"
    transformers_dir.mkdir(parents=True)
    for name, obj in transformer_files.items():
        torch.save(obj, transformers_dir / name)
    vae_dir = root / family.RELEASE_MODEL / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps(official_vae_config(pipe.vae.config)))
    torch.save({k: v.detach().clone() for k, v in pipe.vae.state_dict().items()}, vae_dir / "pytorch_model.pt")
    # text_encoder/: the LLaVA language model as the release's preprocessing saves it (LlamaForCausalLM + tokenizer)
    llama = LlamaForCausalLM(pipe.text_encoder.config).eval()
    llama.model.load_state_dict(pipe.text_encoder.state_dict())
    llama.save_pretrained(root / "text_encoder")
    pipe.tokenizer.save_pretrained(root / "text_encoder")
    # text_encoder_2/: openai/clip-vit-large-patch14 as downloaded, a CLIPModel with its vision tower
    text = pipe.text_encoder_2.config.to_dict()
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    clip.text_model.load_state_dict(pipe.text_encoder_2.state_dict())
    clip.save_pretrained(root / "text_encoder_2")
    pipe.tokenizer_2.save_pretrained(root / "text_encoder_2")


def _reference(pipe, init, steps=3, guidance=6.0):
    with torch.no_grad():
        return pipe(prompt=PROMPT, height=32, width=48, num_frames=9, num_inference_steps=steps, guidance_scale=guidance,
                    latents=torch.from_numpy(init), output_type="latent", max_sequence_length=256,
                    sigmas=torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)[:-1].numpy()).frames.numpy()


def _generate(model, tmp, init):
    np.save(tmp / "init.npy", init)
    main(["generate", "--model", str(model), "--prompt", PROMPT, "--size", "48x32", "--frames", "9", "--steps", "3",
          "--guidance", "6.0", "--init-latents", str(tmp / "init.npy"), "--save-latents", str(tmp / "out.npy"),
          "--quiet", "--overwrite"])
    return np.load(tmp / "out.npy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan_release")
    pipe = build_tiny_hunyuan_pipeline(root / "diffusers", seed=4)
    official = official_state({k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()})
    init = np.random.default_rng(9).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    return root, pipe, official, init


def test_release_layout_matches_diffusers(tiny, tmp_path):
    root, pipe, official, init = tiny
    ckpts = tmp_path / "ckpts"
    write_release(ckpts, pipe, {family.RELEASE_TRANSFORMER: {"module": official}})
    dst = tmp_path / "mlx"
    main(["convert", str(ckpts), str(dst), "--dtype", "fp32"])
    manifest = json.loads((dst / "mlxvid.json").read_text())
    assert manifest["family"] == "hunyuan" and "official release" in manifest["source"]["format"]
    assert sorted(manifest["components"]) == sorted(
        ["transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"])
    # the transformer's dimensions come from its shapes (the release's file has no config)
    config = json.loads((dst / "transformer" / "config.json").read_text())
    assert (config["num_heads"], config["head_dim"], config["rope_axes"], config["num_refiner_blocks"]) == (2, 24, [4, 10, 10], 1)
    ours = _generate(dst, tmp_path, init)
    ref = _reference(pipe, init)
    err = rel_err(ours, ref)
    print(f"HunyuanVideo official release layout vs diffusers: relative error {err:.2e}")
    assert err < 1e-3


def test_fp8_release_decodes_codes_times_scale(tiny, tmp_path):
    root, pipe, official, init = tiny
    state, scales, decoded = fp8_release(official)
    ckpts, plain = tmp_path / "ckpts", tmp_path / "plain"
    # the fp8 variant alone (as the release's fp8 download leaves it), and the weights it decodes to in full precision
    write_release(ckpts, pipe, {family.RELEASE_TRANSFORMER_FP8: {"module": state},
                                "mp_rank_00_model_states_fp8_map.pt": scales})
    write_release(plain, pipe, {family.RELEASE_TRANSFORMER: {"module": decoded}})
    for src, dst in ((ckpts, tmp_path / "fp8_mlx"), (plain, tmp_path / "plain_mlx")):
        main(["convert", str(src), str(dst), "--dtype", "fp32"])
    fp8_out = _generate(tmp_path / "fp8_mlx", tmp_path, init)
    plain_out = _generate(tmp_path / "plain_mlx", tmp_path, init)
    ref = _reference(pipe, init)
    exact, close = rel_err(fp8_out, plain_out), rel_err(fp8_out, ref)
    print(f"HunyuanVideo fp8 release: vs its decoded weights {exact:.2e}, vs the full-precision reference {close:.2e}")
    assert exact < 1e-5 and close < 5e-2


def test_fp8_release_kept_as_fp8_with_quantize_fp8(tiny, tmp_path):
    import mlx.core as mx

    root, pipe, official, _ = tiny
    state, scales, _ = fp8_release(official)
    ckpts = tmp_path / "ckpts"
    write_release(ckpts, pipe, {family.RELEASE_TRANSFORMER_FP8: {"module": state},
                                "mp_rank_00_model_states_fp8_map.pt": scales})
    dst = tmp_path / "mlx"
    main(["convert", str(ckpts), str(dst), "--dtype", "fp32", "--quantize", "fp8"])
    record = json.loads((dst / "transformer" / "quantization.json").read_text())
    assert set(record["layers"].values()) == {"e4m3fn"}
    weights = {}
    for shard in (dst / "transformer").glob("*.safetensors"):
        weights.update(mx.load(str(shard)))
    key = "double_blocks.1.img.attn_qkv"
    codes = np.array(weights[f"{key}.weight"])
    assert np.array_equal(codes, state["double_blocks.1.img_attn_qkv.weight"].view(torch.uint8).numpy())
    assert float(np.array(weights[f"{key}.weight_scale"])) == float(scales["double_blocks.1.img_attn_qkv"])
    # the fp8 layers the release has are all kept as codes; the refiner's, which it stores in full precision, encoded
    released = {k[: -len(".weight")] for k in state if state[k].dtype == torch.float8_e4m3fn}
    assert len(released) == len([k for k in record["layers"] if not k.startswith("txt_in.")])


def test_fp8_release_without_its_map_is_refused(tiny, tmp_path):
    root, pipe, official, _ = tiny
    state, _, _ = fp8_release(official)
    ckpts = tmp_path / "ckpts"
    write_release(ckpts, pipe, {family.RELEASE_TRANSFORMER_FP8: {"module": state}})
    with pytest.raises((MlxVideoError, SystemExit)):
        main(["convert", str(ckpts), str(tmp_path / "mlx"), "--dtype", "fp32"])


def test_official_config_from_full_size_shapes():
    """At full size (diffusers' model on the meta device, renamed to the official names): the dimensions read
    from the shapes are the published configuration."""
    from diffusers import HunyuanVideoTransformer3DModel

    from mlx_video.families.hunyuan.config import HUNYUAN_T2V_720P

    with torch.device("meta"):
        reference = HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
            num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
            rope_theta=256.0, rope_axes_dim=(16, 56, 56))
    official = official_state(dict(reference.state_dict()))
    shapes = {k: tuple(v.shape) for k, v in official.items()}
    config = family.official_transformer_config(list(shapes), shapes.__getitem__, HUNYUAN_T2V_720P)
    assert config == HUNYUAN_T2V_720P

    # the fp8 release at full size: every key maps onto our model (built lazily) with the right shape, and with
    # --quantize fp8 every released fp8 layer is kept as its codes (no data: shapes and dtypes only)
    from mlx_video.convert.convert import ComponentPlan, plan_component
    from mlx_video.convert.formats import ComponentSource
    from mlx_video.families.hunyuan.keys import OFFICIAL_TRANSFORMER
    from mlx_video.convert.quantize import plan_item
    from mlx_video.families.hunyuan.transformer import HunyuanTransformer

    fp8 = {k for k, v in shapes.items() if k.startswith(("double_blocks.", "single_blocks.")) and len(v) == 2}
    weights = HeaderOnly(shapes, {k: "F8_E4M3" if k in fp8 else "BF16" for k in shapes})
    scale_map = HeaderOnly({k[: -len(".weight")]: () for k in fp8}, {k[: -len(".weight")]: "F32" for k in fp8})
    source = ComponentSource(family.Fp8ScaleMap(weights, scale_map, "fp8"), "fp8")
    comp = ComponentPlan("transformer", source, OFFICIAL_TRANSFORMER, config.to_dict(), HunyuanTransformer(config),
                         low_precision=family.LOW_PRECISION_TRANSFORMER)
    plan_component(comp)
    modes = {t: plan_item("transformer", t, k, tr, sh, source, "bf16", "fp8", 64, comp.low_precision).mode
             for t, (k, sh, tr) in comp.tensors.items()}
    assert len(fp8) == 20 * 10 + 40 * 3
    assert sum(m == "fp8_copy" for m in modes.values()) == len(fp8)
    assert sum(m == "fp8_encode" for m in modes.values()) == 2 * 5  # the token refiner's, stored bf16 in the release


class HeaderOnly(TensorFile):
    """Shapes and dtypes without data."""

    def __init__(self, shapes: dict, codes: dict):
        self._shapes, self._codes = {k: tuple(v) for k, v in shapes.items()}, dict(codes)
        self.paths, self.metadata = [], {}
