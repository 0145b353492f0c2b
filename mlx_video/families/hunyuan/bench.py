"""HunyuanVideo's benchmark cases (mlx_video/bench_case.py): one denoising step of a reduced-depth transformer at
the real width (24 heads x 128 = 3072, MLP 12288, the real embedders and token refiner; 256 text tokens of which
77 hold the prompt, embedded guidance, batch 1), the 884-16c VAE decode with the pipeline's tiling, and diffusers'
HunyuanVideoTransformer3DModel as data for benchmarks/harness.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_video.bench_case import DTYPES, ReferenceCase, StepCase, VAECase, materialise
from mlx_video.families.hunyuan import cost_model as cost

DEPTH = {"double": 1, "single": 1, "refiner": 2}
TIMESTEP = 500.0
GUIDANCE = 6.0 * 1000.0  # the embedded guidance as the pipeline passes it (scale x 1000)
PROMPT_TOKENS = 77
# diffusers' HunyuanVideoTransformer3DModel arguments at the release's widths (hunyuanvideo-community's
# transformer/config.json); the depth comes from the case
REAL_WIDTH = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, mlp_ratio=4.0,
                  patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                  pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56))


def step_case(spec, size, frames, depth, dtype, width=None, seed=0, variant=None, guidance=True) -> StepCase:
    """`width`: HunyuanVideoTransformer3DModel arguments replacing REAL_WIDTH (tests use tiny ones). The step
    runs one forward whatever `guidance` says: HunyuanVideo's guidance is embedded, not classifier-free."""
    from mlx_video.families.hunyuan.keys import transformer_config_from_diffusers

    if variant:
        raise ValueError(f"{spec.id} has no step variants")
    kwargs = {**REAL_WIDTH, **(width or {}), "num_layers": depth["double"], "num_single_layers": depth["single"],
              "num_refiner_layers": depth["refiner"]}
    if spec.transformer.image_condition:  # I2V: the first latent frame's tokens conditioned as the model says
        kwargs["image_condition_type"] = spec.transformer.image_condition
    cfg = transformer_config_from_diffusers({"_class_name": "HunyuanVideoTransformer3DModel", **kwargs})
    full = spec.transformer
    t, h, w = spec.latent_grid(size[0], size[1], frames)
    pt, ph, pw = cfg.patch_size
    tokens, text_len = (t // pt) * (h // ph) * (w // pw), cfg.text_len
    inputs = _inputs(cfg, (t, h, w), text_len, seed)
    return StepCase(
        model_id=spec.id, config=cfg, depth=dict(depth), tokens=tokens, batch=1, text_tokens=text_len,
        full_depth={"double": full.num_double_blocks, "single": full.num_single_blocks,
                    "refiner": full.num_refiner_blocks},
        width=cfg.num_heads * cfg.head_dim, model=lambda dt: _transformer(cfg, dt, seed), forward=_forward,
        inputs=inputs, uncast=("guidance",), flops=cost.forward_flops(cfg, tokens, text_len).total,
        full_flops=cost.forward_flops(_full_width(full, cfg), tokens, text_len).total,
        reference=_reference(kwargs, inputs), info={"latent": (t, h, w), "prompt_tokens": PROMPT_TOKENS})


def _full_width(full, cfg):
    from dataclasses import replace

    return replace(cfg, num_double_blocks=full.num_double_blocks, num_single_blocks=full.num_single_blocks,
                   num_refiner_blocks=full.num_refiner_blocks)


def _inputs(cfg, latent, text_len, seed) -> dict:
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros((1, text_len), np.int32)
    mask[:, :PROMPT_TOKENS] = 1  # a prompt of 77 tokens, the rest padding, as the pipeline passes it
    return {"latents": rng.standard_normal((1, *latent, cfg.in_channels), dtype=np.float32),
            "text": rng.standard_normal((1, text_len, cfg.text_dim), dtype=np.float32), "mask": mask,
            "pooled": rng.standard_normal((1, cfg.pooled_dim), dtype=np.float32),
            "guidance": np.array([GUIDANCE], np.float32)}


def _transformer(cfg, dtype, seed):
    from mlx_video.families.hunyuan.transformer import HunyuanTransformer

    mx.random.seed(seed)
    return HunyuanTransformer(cfg, dtype=DTYPES[dtype])


def _forward(model, x):
    return model(x["latents"], mx.array([TIMESTEP]), x["text"], x["mask"], x["pooled"], guidance=x["guidance"])


def _convert(state: dict) -> list:
    from mlx_video.families.hunyuan.keys import DIFFUSERS_TRANSFORMER, convert_weights

    return list(convert_weights(DIFFUSERS_TRANSFORMER, state).items())


def _reference(kwargs, inputs) -> ReferenceCase:
    """diffusers' HunyuanVideoTransformer3DModel: (B, C, T, H, W) latents, the mask as int64, the guidance cast."""
    return ReferenceCase(
        class_name="HunyuanVideoTransformer3DModel", kwargs=kwargs, convert=_convert,
        inputs={"hidden_states": np.ascontiguousarray(inputs["latents"].transpose(0, 4, 1, 2, 3)),
                "timestep": np.array([TIMESTEP], np.float32), "encoder_hidden_states": inputs["text"],
                "encoder_attention_mask": inputs["mask"].astype(np.int64), "pooled_projections": inputs["pooled"],
                "guidance": inputs["guidance"]},
        args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections"),
        keywords=("guidance",), uncast=("timestep",))


def vae_case(spec, dtype="fp32", width=None, chunk=None, seed=0) -> VAECase:
    """The 884-16c VAE at its real channel widths (128/256/512/512), weights scaled by 0.05 to keep activations
    in range, decoding with the pipeline's tiling (`VAETiling()`: clips of 16 frames with a 4-frame blend,
    256-pixel tiles), against `cost.decode_activation_bytes`."""
    from mlx.utils import tree_map

    from mlx_video.families.hunyuan.config import HUNYUAN_VAE
    from mlx_video.families.hunyuan.vae import HunyuanVAE, VAETiling

    if width or chunk is not None:
        raise ValueError("the HunyuanVideo VAE case takes no --width or --chunk (it decodes with VAETiling())")
    mx.random.seed(seed)
    vae = HunyuanVAE(HUNYUAN_VAE, dtype=mx.float32)
    tiling = VAETiling()

    def load(dtype, part="decoder"):
        vae.update(tree_map(lambda p: p * 0.05 if p.ndim > 1 else p, vae.parameters()))
        return materialise(vae, dtype)

    def decode(z):
        return int(np.array(vae.decode(z, tiling=tiling)).shape[1])

    return VAECase(
        description=f"real widths {HUNYUAN_VAE.block_out_channels}, tiled ({vars(tiling)})",
        config=HUNYUAN_VAE.to_dict(), spatial=8, temporal=4, latent_channels=16, load=load, decode=decode,
        estimate=lambda w, h, frames: cost.decode_activation_bytes(w, h, frames, HUNYUAN_VAE,
                                                                   (tiling.sample_size,) * 2, tiling.frames + 1))


GPU_CHECK = {
    "real": {"step": {"model": "hunyuanvideo-t2v", "size": [832, 480], "frames": 81,
                      "depth": {"double": 1, "single": 1, "refiner": 2}}},
    "dry": {"step": {"model": "hunyuanvideo-t2v", "size": [32, 48], "frames": 5,
                     "depth": {"double": 1, "single": 1, "refiner": 1},
                     "width": {"num_attention_heads": 2, "attention_head_dim": 24, "text_embed_dim": 20,
                               "pooled_projection_dim": 12, "rope_axes_dim": [8, 8, 8]}}},
}
