"""HunyuanVideo-I2V end to end: a tiny random diffusers HunyuanVideoImageToVideoPipeline (token replace), saved with
save_pretrained, converted with `mlxvid convert`, run with `mlxvid generate --image`, against the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from support.arrays import rel_err  # noqa: E402
from support.hunyuan import official_sigmas  # noqa: E402
from support.hunyuan_i2v import build_tiny_hunyuan_i2v_pipeline, write_i2v_release  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset, cinematic"
NEGATIVE = "static, blurry, low quality"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("hunyuan_i2v")
    pipe = build_tiny_hunyuan_i2v_pipeline(root / "diffusers")
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    image = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "image.png")
    return root, pipe, image


def _reference(pipe, image, init, steps, frames, output_type="latent", **kwargs):
    from PIL import Image

    height, width = image.shape[:2]
    with torch.no_grad():
        return pipe(image=Image.fromarray(image), prompt=PROMPT, height=height, width=width, num_frames=frames,
                    num_inference_steps=steps, guidance_scale=6.0, latents=torch.from_numpy(init),
                    output_type=output_type, sigmas=official_sigmas(steps), **kwargs).frames


def _ours(root, tag, init, steps, frames, extra=()):
    np.save(root / f"init_{tag}.npy", init)
    out = root / f"out_{tag}.npy"
    main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--image", str(root / "image.png"),
          "--size", "48x32", "--frames", str(frames), "--steps", str(steps), "--guidance", "6",
          "--init-latents", str(root / f"init_{tag}.npy"), "--save-latents", str(out), "--quiet", "--overwrite",
          *extra])
    return np.load(out)


def test_converted_folder(tiny):
    root, _, _ = tiny
    manifest = json.loads((root / "mlx" / "mlxvid.json").read_text())
    assert manifest["family"] == "hunyuan" and manifest["model"] == "hunyuanvideo-i2v" and manifest["task"] == "i2v"
    image_cfg = json.loads((root / "mlx" / "image_encoder" / "config.json").read_text())
    assert image_cfg["feature_layer"] == -2 and image_cfg["text_dim"] == 40 and image_cfg["preprocess"]["crop"] == 48
    transformer_cfg = json.loads((root / "mlx" / "transformer" / "config.json").read_text())
    assert transformer_cfg["image_condition"] == "token_replace"


@pytest.mark.parametrize("prompt,interleave", [(PROMPT, 4), (NEGATIVE, 2)])
def test_llava_prompt_states_match_transformers(tiny, prompt, interleave):
    """Our LLaVA path (tower, projector, splice, Llama, crop) against diffusers' _get_llama_prompt_embeds over
    transformers' LlavaForConditionalGeneration: every kept token, image and text, within 1e-5."""
    from PIL import Image
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    from mlx_video.model_folder import resolve_model
    from mlx_video.text_encoders.llama import JsonTokenizer, LlamaTextEncoder
    from mlx_video.text_encoders.llava import LlavaImageConfig, LlavaImageEncoder, encode_prompts_with_image

    root, pipe, image = tiny
    with torch.no_grad():
        ref, ref_mask = pipe._get_llama_prompt_embeds(Image.fromarray(image), prompt, DEFAULT_PROMPT_TEMPLATE,
                                                      device="cpu", dtype=torch.float32,
                                                      image_embed_interleave=interleave)
    folder = resolve_model(str(root / "mlx"))
    llama = LlamaTextEncoder(folder.config("text_encoder"))
    folder.load_module("text_encoder", llama)
    vision = LlavaImageEncoder(LlavaImageConfig.from_dict(folder.config("image_encoder")))
    folder.load_module("image_encoder", vision)
    tokenizer = JsonTokenizer(root / "mlx" / "tokenizer", pad_token="<|end_of_text|>")
    states, mask = encode_prompts_with_image(llama, vision, tokenizer, [prompt], image, interleave)
    states, mask = np.array(states), np.array(mask)
    assert states.shape == tuple(ref.shape) == (1, 576 // interleave + 252, 40)
    np.testing.assert_array_equal(mask, ref_mask.numpy())
    kept = mask.astype(bool)  # padding rows are never read downstream (masked in the transformer)
    err = rel_err(states[kept], ref.numpy()[kept])
    print(f"LLaVA prompt + image states (interleave {interleave}): relative error {err:.2e}")
    assert err < 1e-5
    # the image reaches the states: another image moves them far past the tolerance
    other, _ = encode_prompts_with_image(llama, vision, tokenizer, [prompt], image[::-1].copy(), interleave)
    assert rel_err(np.array(other)[kept], ref.numpy()[kept]) > 1e-2


def test_cost_model_counts_the_tokens_the_llava_encoder_runs(tiny, monkeypatch):
    """The preflight's text-encoding stage counts the sequence the Llama really runs, measured here: the template's
    103 tokens before the prompt and 256 more, its <image> token replaced by the tower's 576 features (the tiny
    tower's count is the release's): 934, where T2V's template runs 95 + 256."""
    from mlx_video.families.hunyuan import cost_model as cost
    from mlx_video.pipelines.base import GenerationSettings, Pipeline
    from mlx_video.text_encoders.llama import TruncatedDecoder

    root, _, image = tiny
    lengths, run = [], TruncatedDecoder.from_embeddings

    def measured(self, h, attention_mask=None):
        lengths.append(h.shape[1])
        return run(self, h, attention_mask)

    monkeypatch.setattr(TruncatedDecoder, "from_embeddings", measured)
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    pipe.encode_llava([([PROMPT], image, pipe.interleave)])
    assert lengths == [cost.llama_tokens(pipe.text_len, pipe.encoder_image_tokens(), pipe.crop_start)] == [934]
    assert cost.llama_tokens(256) == 351 and cost.llama_tokens(256, cost.LLAVA_IMAGE_TOKENS) == 934
    s = pipe.resolve(GenerationSettings(prompt=PROMPT, image=str(root / "image.png"), width=48, height=32, frames=5))
    stage = pipe.estimate_memory(s)["detail"]["text_encoding"]["activations"]
    assert stage == cost.text_encoding_activation_bytes(1, lengths[0])


def test_cost_model_counts_the_llava_vision_tower(tiny):
    """The closed-form count of LLaVA's vision tower and projector (which the I2V text-encoding stage holds beside the
    Llama) equals transformers' modules and the converted folder's tensors at the tiny config; published: 324.5M."""
    from support.tensor_files import converted_weights

    from mlx_video.families.hunyuan import cost_model as cost

    root, pipe, _ = tiny
    llava = pipe.text_encoder
    reference = sum(p.numel() for name, p in llava.named_parameters() if "vision_tower" in name or "projector" in name)
    stored = sum(v.size for v in converted_weights(root / "mlx", "image_encoder").values())
    tiny_dims = dict(image=48, patch=2, dim=32, ffn=56, layers=3, text_dim=40)
    assert cost.llava_vision_params(**tiny_dims) == reference == stored
    assert cost.llava_vision_params(**cost.LLAVA_VISION) == 303_507_456 + 20_979_712  # CLIP ViT-L/14-336, projector


def test_latents_and_frames_match_diffusers(tiny):
    """Final latents (frame 0 the image's) within 1e-3 and decoded frames within 1/255 of the reference, from one
    run. The latents are held to 1e-4: skipping the 0.001 image blend moves the reference's by about 7e-4, which
    the looser bound would let through."""
    from PIL import Image

    root, pipe, image = tiny
    steps, frames = 3, 9
    init = np.random.default_rng(3).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    ref = _reference(pipe, image, init, steps, frames).numpy()
    ours = _ours(root, "main", init, steps, frames, ["--output", str(root / "frames")])
    err = rel_err(ours, ref)
    print(f"HunyuanVideo-I2V end to end, {steps} steps: relative error {err:.2e}")
    assert ours.shape == ref.shape and err < 1e-4
    image_latents = ref[:, :, :1]
    assert rel_err(ours[:, :, :1], image_latents) < 1e-5 and rel_err(init, ref) > 0.05

    video = np.asarray(_reference(pipe, image, init, steps, frames, output_type="np")[0], np.float32)
    files = sorted((root / "frames").glob("frame_*.png"))
    decoded = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255.0
    assert decoded.shape == video.shape == (frames, 32, 48, 3)
    mad = float(np.abs(decoded - video).mean())
    print(f"HunyuanVideo-I2V decoded frames: mean |difference| {mad * 255:.3f}/255")
    assert mad < 1 / 255 and video.std() > 0.02

    # what the parity would miss if it did not hold: without the 0.999 / 0.001 blend the reference ends elsewhere
    blend = pipe.prepare_latents

    def unblended(*args, **kwargs):
        latents, image_latents = blend(*args, **kwargs)
        return torch.from_numpy(init), image_latents

    pipe.prepare_latents = unblended
    try:
        skipped = _reference(pipe, image, init, steps, frames).numpy()
    finally:
        del pipe.prepare_latents
    assert rel_err(skipped, ref) > 3e-4


@pytest.mark.parametrize("mode", ["batched"])
def test_true_cfg_matches_diffusers(tiny, mode):
    """True CFG: the negative prompt read with a black image and every 2nd image token (diffusers' way), padded
    to the prompt's length for the batched pass."""
    root, pipe, image = tiny
    steps, frames = 2, 5
    init = np.random.default_rng(5).standard_normal((1, 6, 2, 4, 6)).astype(np.float32)
    ref = _reference(pipe, image, init, steps, frames, negative_prompt=NEGATIVE, true_cfg_scale=3.0).numpy()
    ours = _ours(root, f"cfg_{mode}", init, steps, frames,
                 ["--true-cfg", "3", "--negative-prompt", NEGATIVE, "--guidance-mode", mode])
    err = rel_err(ours, ref)
    print(f"HunyuanVideo-I2V true CFG ({mode}): relative error {err:.2e}")
    assert err < 1e-3


def test_bad_input_is_refused_before_weights(tiny):
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, _, _ = tiny
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    assert type(pipe).__name__ == "HunyuanI2VPipeline" and pipe.image_mode == "first_frame"
    image = str(root / "image.png")
    s = pipe.resolve(GenerationSettings(prompt=PROMPT, image=image))
    assert (s.width, s.height, s.frames, s.steps, s.shift, s.guidance) == (1280, 720, 129, 50, 7.0, 6.0)
    with pytest.raises(MlxVideoError, match="--image"):
        pipe.generate(GenerationSettings(prompt=PROMPT, width=48, height=32, frames=5, steps=1))
    with pytest.raises(MlxVideoError, match="tokens long"):
        pipe.resolve(GenerationSettings(prompt="the camera pans " * 120, image=image, width=48, height=32, frames=9))
    estimate = pipe.estimate_memory(s, has_image=True)
    assert set(estimate["stages"]) == {"text_encoding", "denoising", "decoding"}


def test_latent_concat_folder_is_refused(tiny, tmp_path):
    """The 33-channel first release (latent concat) is named and refused before any weights are read."""
    import shutil

    root, _, _ = tiny
    folder = tmp_path / "i2v33"
    shutil.copytree(root / "diffusers", folder)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(in_channels=13, image_condition_type="latent_concat", guidance_embeds=False)
    config_file.write_text(json.dumps(config))
    with pytest.raises(MlxVideoError, match="latent_concat"):
        from mlx_video.families.hunyuan.planner import plan

        plan(folder)


def test_lora_matches_diffusers(tiny, tmp_path):
    """A PEFT LoRA on every linear of the I2V transformer (rank 2, alpha 3), saved by diffusers' save_lora_weights:
    ours fuses it at load; diffusers' load_lora_weights at strength 0.7 gives the same latents."""
    import copy

    from diffusers import HunyuanVideoImageToVideoPipeline

    root, pipe, image = tiny
    rng = np.random.default_rng(9)
    layers = {}
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            w = module.weight
            layers[f"{name}.lora_A.weight"] = torch.from_numpy(
                (rng.standard_normal((2, *w.shape[1:])) / np.sqrt(w[0].numel())).astype(np.float32))
            layers[f"{name}.lora_B.weight"] = torch.from_numpy(
                (rng.standard_normal((w.shape[0], 2, *[1] * (w.ndim - 2))) * 0.3).astype(np.float32))
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in layers})
    HunyuanVideoImageToVideoPipeline.save_lora_weights(
        str(tmp_path), transformer_lora_layers=layers, weight_name="lora.safetensors",
        transformer_lora_adapter_metadata={"r": 2, "lora_alpha": 3, "target_modules": targets})
    steps, frames = 2, 5
    init = np.random.default_rng(13).standard_normal((1, 6, 2, 4, 6)).astype(np.float32)
    with_lora = copy.deepcopy(pipe)
    with_lora.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="style")
    with_lora.transformer.set_adapters(["style"], weights=[0.7])
    ref = _reference(with_lora, image, init, steps, frames).numpy()
    ours = _ours(root, "lora", init, steps, frames, ["--lora", f"{tmp_path / 'lora.safetensors'}:0.7"])
    err = rel_err(ours, ref)
    print(f"HunyuanVideo-I2V with a PEFT LoRA at 0.7: relative error {err:.2e}")
    assert err < 1e-3
    assert rel_err(_reference(pipe, image, init, steps, frames).numpy(), ref) > 0.05  # the LoRA matters


def _weights(folder) -> dict:
    import mlx.core as mx

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}


def test_official_release_layout_converts_to_the_same_model(tiny, tmp_path):
    """tencent/HunyuanVideo-I2V's ckpts/ (transformer in the official names with no config, the VAE's .pt,
    text_encoder_i2v/ and text_encoder_2/) converts to the very weights and configurations of the diffusers folder."""
    import mlx.core as mx

    root, pipe, _ = tiny
    write_i2v_release(tmp_path / "ckpts", pipe)
    main(["convert", str(tmp_path / "ckpts"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    manifest = json.loads((tmp_path / "mlx" / "mlxvid.json").read_text())
    assert manifest["model"] == "hunyuanvideo-i2v" and "HunyuanVideo-I2V" in manifest["source"]["format"]
    for component in ("transformer", "text_encoder", "image_encoder", "text_encoder_2", "vae"):
        ours, theirs = (json.loads((folder / component / "config.json").read_text())
                        for folder in (tmp_path / "mlx", root / "mlx"))
        if component == "transformer":
            assert ours == theirs, component
        mine, reference = (_weights(folder / component) for folder in (tmp_path / "mlx", root / "mlx"))
        assert sorted(mine) == sorted(reference), component
        for key, value in reference.items():
            assert mx.array_equal(mine[key], value).item(), (component, key)
