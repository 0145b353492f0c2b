"""Wan2.1 I2V-14B / FLF2V-14B transformer (CLIP image context) against diffusers' `WanTransformer3DModel` with
`image_dim`, `added_kv_proj_dim` and (FLF2V) `pos_embed_seq_len`, at tiny random configs (three heads of width 10,
two heads of width 12), from the diffusers and the official layouts; and the published sizes' keys and shapes."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.convert.rules import convert_weights  # noqa: E402
from support.wan import WAN_IMAGE_OFFICIAL_RENAMES, randomize_, renamed_keys  # noqa: E402
from support.arrays import rel_err  # noqa: E402
from support.tensor_files import Shapes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # torch on one thread (tests/conftest.py)

IMAGE_TOKENS = 5  # per image (CLIP ViT-H/14 gives 257)


def tiny_reference(heads, head_dim, flf, seed):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=12, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=44, num_layers=2,
                                  image_dim=24, added_kv_proj_dim=heads * head_dim, rope_max_seq_len=1024,
                                  pos_embed_seq_len=2 * IMAGE_TOKENS if flf else None).eval()
    randomize_(model, seed)
    return model


def our_config(heads, head_dim, flf):
    from mlx_video.families.wan.image_model import WanImageConfig

    return WanImageConfig(dim=heads * head_dim, ffn_dim=44, freq_dim=16, text_dim=32, num_heads=heads, num_layers=2,
                          in_channels=12, out_channels=4, image_dim=24,
                          image_positions=2 * IMAGE_TOKENS if flf else None)


def ours_from(state_dict, keymap, cfg):
    from mlx_video.families.wan.image_model import WanImageTransformer

    model = WanImageTransformer(cfg)
    weights = convert_weights(keymap, {k: mx.array(v.detach().numpy()) for k, v in state_dict.items()})
    model.load_weights(list(weights.items()))  # strict: every parameter given, nothing left over
    return model


def official_names(state_dict):
    """The diffusers names as the official Wan2.1 `WanModel` (Wan-Video/Wan2.1 wan/modules/model.py) has them."""
    return renamed_keys(state_dict, WAN_IMAGE_OFFICIAL_RENAMES)


@pytest.mark.parametrize("heads,head_dim,flf", [(3, 10, True), (2, 12, False)])
def test_transformer_matches_diffusers(heads, head_dim, flf):
    from mlx_video.families.wan.keys import DIFFUSERS_IMAGE_TRANSFORMER, OFFICIAL_IMAGE_TRANSFORMER

    ref = tiny_reference(heads, head_dim, flf, seed=heads)
    cfg = our_config(heads, head_dim, flf)
    rng = np.random.default_rng(heads)
    b, t, h, w = 2, 3, 4, 6
    x = rng.standard_normal((b, 12, t, h, w)).astype(np.float32)
    text = rng.standard_normal((b, 512, 32)).astype(np.float32)  # diffusers takes the last 512 rows as the text
    text[0, 9:] = 0
    text[1, 4:] = 0
    images = 2 if flf else 1
    # diffusers' FLF2V input: each sample's first and last image as two rows of 257 tokens, joined by the embedder
    clip = rng.standard_normal((b * images, IMAGE_TOKENS, 24)).astype(np.float32)
    timestep = np.array([731.0, 208.0], np.float32)
    with torch.no_grad():
        expected = ref(hidden_states=torch.from_numpy(x), timestep=torch.from_numpy(timestep),
                       encoder_hidden_states=torch.from_numpy(text), encoder_hidden_states_image=torch.from_numpy(clip),
                       return_dict=False)[0].numpy()
    image = mx.array(clip.reshape(b, images * IMAGE_TOKENS, 24))
    latents = mx.array(x).transpose(0, 2, 3, 4, 1)
    for keymap, state in ((DIFFUSERS_IMAGE_TRANSFORMER, ref.state_dict()),
                          (OFFICIAL_IMAGE_TRANSFORMER, official_names(ref.state_dict()))):
        model = ours_from(state, keymap, cfg)
        per_call = model(latents, mx.array(timestep), mx.array(text), image)
        prepared = model(latents, mx.array(timestep), model.prepare_context(mx.array(text), image))
        for out in (per_call, prepared):
            err = rel_err(np.array(out.transpose(0, 4, 1, 2, 3)), expected)
            print(f"Wan2.1 {'FLF2V' if flf else 'I2V'} transformer ({heads}x{head_dim}): relative error {err:.2e}")
            assert err < 1e-5


def test_image_token_count_is_checked():
    from mlx_video.families.wan.image_model import WanImageTransformer

    model = WanImageTransformer(our_config(3, 10, flf=True))
    with pytest.raises(ValueError, match="takes 10 CLIP tokens"):
        model.image_embedding(mx.zeros((1, IMAGE_TOKENS, 24)))
    with pytest.raises(ValueError, match="CLIP features"):
        model.prepare_context(mx.zeros((1, 7, 32)), mx.zeros((1, 10, 7)))


def test_full_size_keys_and_shapes():
    """The published Wan2.1 I2V-14B and FLF2V-14B sizes (diffusers' model on the meta device, and its official
    names) convert onto every parameter of our model with its shape."""
    from diffusers import WanTransformer3DModel
    from mlx.utils import tree_flatten

    from mlx_video.families.wan.image_model import WAN21_FLF2V_14B, WAN21_I2V_14B, WanImageTransformer
    from mlx_video.families.wan.keys import DIFFUSERS_IMAGE_TRANSFORMER, OFFICIAL_IMAGE_TRANSFORMER
    from mlx_video.families.wan.animate_planner import target_shapes

    for cfg in (WAN21_I2V_14B, WAN21_FLF2V_14B):
        with torch.device("meta"):  # the published diffusers configs (Wan-AI/Wan2.1-*-Diffusers)
            ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                        in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                        num_layers=40, cross_attn_norm=True, eps=1e-6, image_dim=1280,
                                        added_kv_proj_dim=5120, rope_max_seq_len=1024,
                                        pos_embed_seq_len=cfg.image_positions)
        with mx.stream(mx.cpu):
            ours = {k: tuple(v.shape) for k, v in tree_flatten(WanImageTransformer(cfg).parameters())}
        for state, keymap in ((ref.state_dict(), DIFFUSERS_IMAGE_TRANSFORMER),
                              (official_names(ref.state_dict()), OFFICIAL_IMAGE_TRANSFORMER)):
            assert target_shapes(Shapes(state), keymap) == ours
        assert len(ours) > 1000


# ---- the whole pipeline: WanImageToVideoPipeline with a CLIP image encoder and a last image (FLF2V) ----

PROMPT, NEGATIVE = "a kite rises over a beach", "blurry"
WIDTH, HEIGHT, FRAMES = 48, 32, 9
CLIP_WIDTH, CLIP_TOKENS = 80, 17  # one 80-wide head (the official file's width); 28x28 in 7x7 patches + class


def make_image(path, seed):
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (HEIGHT // 4, WIDTH // 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).resize((WIDTH, HEIGHT), Image.BILINEAR).save(path)
    return Image.open(path).convert("RGB")


def build_converted(root, flf: bool, heads: int, head_dim: int):
    """A tiny diffusers WanImageToVideoPipeline with a CLIP image encoder (FLF2V: the image positions), saved and
    converted: (root, pipe, first image, last image)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mlx_video.cli import main
    from support.wan import build_tiny_wan_pipeline

    torch.manual_seed(5)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=24, num_hidden_layers=3,
                                               num_attention_heads=1, image_size=28, patch_size=7,
                                               hidden_act="gelu")).eval()
    randomize_(encoder, 5)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    pipe = build_tiny_wan_pipeline(root / "diffusers", two_experts=False, shift=16.0 if flf else 3.0,
                                   image_to_video=True, image_encoder=encoder, image_processor=processor, heads=heads,
                                   head_dim=head_dim, image_dim=CLIP_WIDTH, added_kv_proj_dim=heads * head_dim,
                                   pos_embed_seq_len=2 * CLIP_TOKENS if flf else None)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root, pipe, make_image(root / "first.png", 1), make_image(root / "last.png", 2)


@pytest.fixture(scope="module")
def flf2v(tmp_path_factory):
    return build_converted(tmp_path_factory.mktemp("flf2v"), flf=True, heads=3, head_dim=10)


def test_flf2v_pipeline_matches_diffusers(flf2v, tmp_path):
    from support.wan import decode_like_diffusers, use_official_sigmas

    from mlx_video.cli import main

    root, pipe, first, last = flf2v
    use_official_sigmas(pipe)
    steps, guidance = 4, 5.0
    init = np.random.default_rng(3).standard_normal((1, 4, 3, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    with torch.no_grad():
        ref = pipe(image=first, last_image=last, prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                   num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=512,
                   latents=torch.from_numpy(init), output_type="latent").frames
        ref_frames = decode_like_diffusers(pipe, ref)
    ref = ref.numpy()
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--image", str(root / "first.png"), "--last-image", str(root / "last.png"), "--size", f"{WIDTH}x{HEIGHT}",
          "--frames", str(FRAMES), "--steps", str(steps), "--guidance", str(guidance), "--shift", "16",
          "--init-latents", str(tmp_path / "init.npy"), "--save-latents", str(tmp_path / "out.npy"),
          "--output", str(tmp_path / "frames"), "--quiet"])
    from PIL import Image

    err = rel_err(np.load(tmp_path / "out.npy"), ref)
    frames = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "frames").glob("*.png"))])
    pixel_err = float(np.abs(frames.astype(np.float64) - np.round(ref_frames * 255)).mean())
    print(f"Wan2.1 FLF2V pipeline: latents relative error {err:.2e}, frames mean abs {pixel_err:.3f}/255")
    assert err < 1e-3
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert pixel_err < 1.0


def test_flf2v_refusals(flf2v, tmp_path):
    from mlx_video.errors import MlxVideoError
    from mlx_video.run import prepare

    root = flf2v[0]
    base = {"model": str(root / "mlx"), "prompt": PROMPT, "save_latents": str(tmp_path / "x.npy"),
            "size": f"{WIDTH}x{HEIGHT}", "frames": FRAMES}
    with pytest.raises(MlxVideoError, match="give the last one with --last-image"):
        prepare({**base, "image": str(root / "first.png")}, check_memory=False)
    with pytest.raises(MlxVideoError, match="pass --image"):
        prepare(base, check_memory=False)


def test_memory_estimate_counts_the_image_encoder(flf2v):
    from mlx_video.families.wan.pipeline import WanPipeline
    from mlx_video.model_folder import ModelFolder
    from mlx_video.pipelines.base import GenerationSettings

    root = flf2v[0]
    pipe = WanPipeline(ModelFolder.open(root / "mlx"))
    s = pipe.resolve(GenerationSettings(prompt=PROMPT, width=WIDTH, height=HEIGHT, frames=FRAMES, image="<array>",
                                        last_image="<array>"))
    clip = pipe.component_bytes("image_encoder")
    assert clip > 0
    assert pipe.estimate_memory(s, has_image=True)["stages"]["image_encoding"] >= 2 * clip


def test_official_release_folder_converts_like_the_diffusers_one(flf2v, tmp_path):
    """The official Wan2.1 FLF2V release's layout (the model shards with config.json `model_type: flf2v`, the CLIP
    and T5 .pth files, google/umt5-xxl/) converts to the same transformer, CLIP and text-encoder weights as the
    diffusers folder (the official VAE path is the other Wan models', tested with them)."""
    import json
    import shutil

    from safetensors.torch import save_file

    from mlx_video.cli import main
    from mlx_video.families.wan.animate_planner import OFFICIAL_CLIP
    from support.tensor_files import converted_weights
    from support.wan_checkpoints import official_clip, official_umt5

    root, pipe = flf2v[:2]
    src = tmp_path / "Wan2.1-FLF2V-14B-720P"
    (src / "google" / "umt5-xxl").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in official_names(pipe.transformer.state_dict()).items()},
              str(src / "diffusion_pytorch_model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "flf2v", "in_dim": 12, "out_dim": 4, "dim": 30, "ffn_dim": 40,
        "freq_dim": 16, "text_dim": 32, "num_heads": 3, "num_layers": 2}))
    torch.save(official_umt5(pipe.text_encoder.state_dict()), src / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(official_clip(pipe.image_encoder.state_dict()), src / OFFICIAL_CLIP)
    shutil.copyfile(root / "diffusers" / "tokenizer" / "spiece.model", src / "google" / "umt5-xxl" / "spiece.model")
    main(["convert", str(src), str(tmp_path / "mlx"), "--dtype", "fp32"])
    assert json.loads((tmp_path / "mlx" / "mlxvid.json").read_text())["model"] == "wan2.1-flf2v-14b"
    assert json.loads((tmp_path / "mlx" / "transformer" / "config.json").read_text())["image_positions"] == 34
    for component in ("transformer", "image_encoder", "text_encoder"):
        ours, want = converted_weights(tmp_path / "mlx", component), converted_weights(root / "mlx", component)
        assert ours.keys() == want.keys(), component
        for k in want:
            np.testing.assert_array_equal(ours[k], want[k], err_msg=f"{component}: {k}")


def test_i2v_pipeline_matches_diffusers(tmp_path):
    """Wan2.1 I2V: one image's CLIP tokens, no image positions (2 heads of width 14); a last image is refused."""
    from mlx_video.cli import main
    from mlx_video.errors import MlxVideoError
    from mlx_video.run import prepare
    from support.wan import use_official_sigmas

    root, pipe, first, _ = build_converted(tmp_path, flf=False, heads=2, head_dim=14)
    assert json_of(root / "mlx" / "mlxvid.json")["model"] == "wan2.1-i2v-14b-720p"
    use_official_sigmas(pipe)
    frames, steps, guidance = 5, 3, 4.0
    init = np.random.default_rng(4).standard_normal((1, 4, 2, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    with torch.no_grad():
        ref = pipe(image=first, prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=512,
                   latents=torch.from_numpy(init), output_type="latent").frames.numpy()
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
          "--image", str(root / "first.png"), "--size", f"{WIDTH}x{HEIGHT}", "--frames", str(frames), "--steps",
          str(steps), "--guidance", str(guidance), "--shift", "3", "--init-latents", str(tmp_path / "init.npy"),
          "--save-latents", str(tmp_path / "out.npy"), "--quiet"])
    err = rel_err(np.load(tmp_path / "out.npy"), ref)
    print(f"Wan2.1 I2V pipeline: latents relative error {err:.2e}")
    assert err < 1e-3
    with pytest.raises(MlxVideoError, match="takes no last image"):
        prepare({"model": str(root / "mlx"), "prompt": PROMPT, "image": str(root / "first.png"),
                 "last_image": str(root / "last.png"), "save_latents": str(tmp_path / "x.npy")}, check_memory=False)


def json_of(path):
    import json

    return json.loads(path.read_text())


def test_lora_on_backbone_and_image_layers_matches_diffusers(flf2v, tmp_path):
    """A PEFT LoRA (diffusers' save_lora_weights) on a self-attention query and the image key/value projections of
    FLF2V, at 0.6: diffusers' load_lora_weights + set_adapters against ours fused at load."""
    import copy

    pytest.importorskip("peft")
    from diffusers import WanImageToVideoPipeline

    from mlx_video.cli import main
    from support.wan import use_official_sigmas

    root, pipe, first, last = flf2v
    rng = np.random.default_rng(31)
    dim, rank = 30, 2
    layers = ["blocks.0.attn1.to_q", "blocks.1.attn2.add_k_proj", "blocks.0.attn2.add_v_proj"]
    tensors = {}
    for name in layers:
        tensors[f"{name}.lora_A.weight"] = torch.from_numpy((rng.standard_normal((rank, dim)) / np.sqrt(dim)).astype(np.float32))
        tensors[f"{name}.lora_B.weight"] = torch.from_numpy((rng.standard_normal((dim, rank)) * 0.3).astype(np.float32))
    meta = {"r": rank, "lora_alpha": 4.0, "target_modules": sorted(n.split(".", 2)[2] for n in layers)}
    WanImageToVideoPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=tensors,
                                              transformer_lora_adapter_metadata=meta, weight_name="flf.safetensors")
    ref_pipe = copy.deepcopy(pipe)
    use_official_sigmas(ref_pipe)
    ref_pipe.load_lora_weights(str(tmp_path / "flf.safetensors"), adapter_name="style")
    ref_pipe.transformer.set_adapters(["style"], weights=[0.6])
    init = np.random.default_rng(8).standard_normal((1, 4, 2, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    with torch.no_grad():
        ref = ref_pipe(image=first, last_image=last, prompt=PROMPT, height=HEIGHT, width=WIDTH, num_frames=5,
                       num_inference_steps=2, guidance_scale=1.0, max_sequence_length=512,
                       latents=torch.from_numpy(init), output_type="latent").frames.numpy()
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--image", str(root / "first.png"),
          "--last-image", str(root / "last.png"), "--size", f"{WIDTH}x{HEIGHT}", "--frames", "5", "--steps", "2",
          "--guidance", "1", "--shift", "16", "--init-latents", str(tmp_path / "init.npy"),
          "--lora", f"{tmp_path / 'flf.safetensors'}:0.6", "--save-latents", str(tmp_path / "out.npy"), "--quiet"])
    err = rel_err(np.load(tmp_path / "out.npy"), ref)
    print(f"Wan2.1 FLF2V with a LoRA on backbone and image layers: relative error {err:.2e}")
    assert err < 1e-3
