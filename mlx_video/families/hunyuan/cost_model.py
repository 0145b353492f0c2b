"""HunyuanVideo's cost model: parameters, stored bytes, FLOPs and an activation-memory estimate of a generation,
from the configurations alone (no weights, no device). `HunyuanPipeline.estimate_memory` (the preflight) and
`mlx_video.cost.predict` use it.

FLOP convention (as Wan's, mlx_video/families/wan/cost_model.py): a linear layer costs 2 * rows * in * out; attention
costs 4 * N_q * N_kv * d per layer (d = heads * head_dim); norms, RoPE and elementwise work are not counted.
Over N video tokens and L text tokens (all L text positions: an upper bound, padding is dropped at batch 1):
  - double-stream block: per stream q|k|v and the output projection (4 d^2) and the MLP (2 d m) over its own
    tokens, one joint attention over N + L;
  - single-stream block: linear1 (d -> 3d + m) and linear2 (d + m -> d) over N + L, joint attention;
  - token refiner: the input projection (text_dim -> d), and per block q|k|v, output and MLP over L plus
    attention over L; the patch embedding and the output layer over N.
The text encoders: the Llama path runs all but the last `skip` layers per prompt over the template's tokens before
the prompt and 256 more: 95 + 256 for T2V; for I2V (LLaVA) 103 + 256 with the 576 image features in place of the
one <image> token, 934 (`llama_tokens`), after LLaVA's vision tower over 577 patches; CLIP-L over 77 tokens.
"""

from __future__ import annotations

import math
from functools import lru_cache

from mlx_video.cost import (
    DEFAULT_GROUP_SIZE, FlopBreakdown, ParamCount, PeakEstimate, bytes_per_weight, dtype_bytes, generation_flops,
)
from mlx_video.families.hunyuan.config import HUNYUAN_VAE, HunyuanTransformerConfig, HunyuanVAEConfig
from mlx_video.text_encoders.llama import VIDEO_TEMPLATE_CROP_START
from mlx_video.text_encoders.llava import I2V_TEMPLATE_CROP_START

LLAVA_IMAGE_TOKENS = (336 // 14) ** 2  # the release's CLIP ViT-L/14 tower at 336 px, class token dropped (llava.py)
CLIP_TOKENS = 77
# Llama-3-8B (the LLaVA-Llama-3 language model) and CLIP-L text: published dimensions.
LLAMA_8B = dict(vocab=128320, dim=4096, ffn=14336, layers=32, heads=32, kv_heads=8, skip=2)
CLIP_L_TEXT_PARAMS = 123_060_480  # CLIPTextModel of openai/clip-vit-large-patch14
# LLaVA-Llama-3-8B's vision tower (CLIP ViT-L/14 at 336 px) and projector into the Llama's width: published dimensions.
LLAVA_VISION = dict(image=336, patch=14, dim=1024, ffn=4096, layers=24, text_dim=4096, feature_layer=-2)


def token_grid(spec, width: int, height: int, frames: int,
               config: HunyuanTransformerConfig | None = None) -> tuple[int, int, int]:
    t, h, w = spec.latent_grid(width, height, frames)
    pt, ph, pw = (config or spec.transformer).patch_size
    return t // pt, h // ph, w // pw


def llama_tokens(text_len: int = 256, image_tokens: int = 0, crop_start: int | None = None) -> int:
    """Tokens the Llama encoder runs per prompt: the template's tokens before the prompt (`crop_start`; T2V's 95,
    I2V's 103 by default) and `text_len` more (the prompt, the template's end, padding); an I2V encoder's image
    features (`image_tokens`) take the place of its template's one <image> token (mlx_video.text_encoders.llava)."""
    if crop_start is None:
        crop_start = I2V_TEMPLATE_CROP_START if image_tokens else VIDEO_TEMPLATE_CROP_START
    return crop_start + text_len + (image_tokens - 1 if image_tokens else 0)


def encoder_image_tokens(spec) -> int:
    """The image features the model's text encoder reads beside the prompt: LLaVA's for an I2V model, else none."""
    return LLAVA_IMAGE_TOKENS if spec.task == "i2v" else 0


def tokens(spec, width: int, height: int, frames: int, config: HunyuanTransformerConfig | None = None) -> int:
    return math.prod(token_grid(spec, width, height, frames, config))


def transformer_params(config: HunyuanTransformerConfig) -> dict[str, ParamCount]:
    """Closed-form parameter count of `HunyuanTransformer(config)`; `block_linear` holds the double- and
    single-stream blocks' projection and MLP weights (what quantization would store in low precision)."""
    d, m, p = config.hidden_size, config.mlp_dim, math.prod(config.patch_size)
    mr = int(d * config.refiner_mlp_ratio)
    stream_w = 3 * d * d + d * d + 2 * d * m  # q|k|v, output projection, MLP
    stream_other = 6 * d * d + 6 * d + 3 * d + d + m + d + 2 * config.head_dim  # modulation, biases, q/k norms
    double = ParamCount(2 * stream_w, 2 * stream_other)
    single = ParamCount(d * (3 * d + m) + (d + m) * d, 3 * d * d + 3 * d + (3 * d + m) + d + 2 * config.head_dim)
    refiner_block = (4 * d * d + 4 * d) + 2 * d + 2 * d * mr + mr + d + 2 * d * d + 2 * d + 2 * d
    embed = lambda i: i * d + d + d * d + d  # noqa: E731  (a two-layer MLP embedder)
    return {
        "img_in": ParamCount(0, p * config.in_channels * d + d),
        "embedders": ParamCount(0, embed(config.freq_dim) + embed(config.pooled_dim)
                                + (embed(config.freq_dim) if config.guidance_embed else 0)),
        "token_refiner": ParamCount(0, config.text_dim * d + d + embed(config.freq_dim) + embed(config.text_dim)
                                    + config.num_refiner_blocks * refiner_block),
        "double_blocks": ParamCount(double.block_linear * config.num_double_blocks, double.other * config.num_double_blocks),
        "single_blocks": ParamCount(single.block_linear * config.num_single_blocks, single.other * config.num_single_blocks),
        "final_layer": ParamCount(0, 2 * d * d + 2 * d + d * p * config.out_channels + p * config.out_channels),
    }


def llama_params(used_layers: bool = True) -> int:
    """Llama-3-8B parameters (the text path builds all but the last `skip` layers and no final norm)."""
    c = LLAMA_8B
    head_dim = c["dim"] // c["heads"]
    layer = c["dim"] * c["dim"] * 2 + 2 * c["dim"] * c["kv_heads"] * head_dim + 3 * c["dim"] * c["ffn"] + 2 * c["dim"]
    layers = c["layers"] - (c["skip"] if used_layers else 0)
    return c["vocab"] * c["dim"] + layers * layer + (0 if used_layers else c["dim"])


def llava_vision_params(image: int = 336, patch: int = 14, dim: int = 1024, ffn: int = 4096, layers: int = 24,
                        text_dim: int = 4096, **_ignored) -> int:
    """LLaVA's CLIP vision tower (patch embedding without bias, class and position embeddings, pre- and post-norm,
    `layers` pre-norm blocks) and its two-layer projector (with biases) into the Llama's `text_dim`."""
    positions = (image // patch) ** 2 + 1
    embeddings = 3 * patch * patch * dim + dim + positions * dim + 2 * dim
    block = 4 * (dim * dim + dim) + 2 * dim * ffn + ffn + dim + 4 * dim
    return embeddings + layers * block + 2 * dim + dim * text_dim + text_dim + text_dim * text_dim + text_dim


def llava_vision_flops(image: int = 336, patch: int = 14, dim: int = 1024, ffn: int = 4096, layers: int = 24,
                       text_dim: int = 4096, feature_layer: int = -2) -> float:
    """One image through the tower's blocks up to hidden state `feature_layer` and the projector (patch embedding
    and norms not counted)."""
    n = (image // patch) ** 2 + 1
    run = (layers + 1 + feature_layer) if feature_layer < 0 else feature_layer
    per_block = 2 * n * (4 * dim * dim + 2 * dim * ffn) + 4 * n * n * dim
    return float(run * per_block + 2 * (n - 1) * (dim * text_dim + text_dim * text_dim))


@lru_cache(maxsize=8)
def vae_params(vae_config: HunyuanVAEConfig = HUNYUAN_VAE, decoder_only: bool = False) -> int:
    """Counted from the module tree (MLX builds it lazily: nothing is materialised)."""
    from mlx.utils import tree_flatten

    from mlx_video.families.hunyuan.vae import HunyuanVAE

    vae = HunyuanVAE(vae_config)
    tree = [vae.decoder.parameters(), vae.post_quant_conv.parameters()] if decoder_only else vae.parameters()
    return sum(v.size for _, v in tree_flatten(tree))


def transformer_weight_bytes(config: HunyuanTransformerConfig, dtype: str = "bf16", quantize: str | None = None,
                             group_size: int = DEFAULT_GROUP_SIZE) -> int:
    counts = transformer_params(config).values()
    linear, other = sum(c.block_linear for c in counts), sum(c.other for c in counts)
    return int(linear * bytes_per_weight(dtype, quantize, group_size) + other * dtype_bytes(dtype))


def weight_bytes(spec, dtype: str = "bf16", quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 transformer: HunyuanTransformerConfig | None = None) -> dict[str, int]:
    """Bytes of each component as a converted folder stores them: the Llama encoder without the layers it never
    runs (the converter leaves them out) and CLIP in `dtype`, the VAE in float32."""
    expert = transformer_weight_bytes(transformer or spec.transformer, dtype, quantize, group_size)
    out = {
        "transformer_expert": expert,
        "transformer_all_experts": expert,
        "text_encoder": (llama_params() + (llava_vision_params(**LLAVA_VISION) if spec.task == "i2v" else 0))
        * dtype_bytes(dtype),  # an I2V folder's text-encoding stage holds LLaVA's tower too
        "text_encoder_2": CLIP_L_TEXT_PARAMS * dtype_bytes(dtype),
        "vae": vae_params() * 4,
    }
    out["total_on_disk"] = sum(v for k, v in out.items() if k != "transformer_all_experts")
    return out


def forward_flops(config: HunyuanTransformerConfig, n_tokens: int, text_len: int = 256, batch: int = 1) -> FlopBreakdown:
    d, m, p = config.hidden_size, config.mlp_dim, math.prod(config.patch_size)
    mr = int(d * config.refiner_mlp_ratio)
    n, L = n_tokens, text_len
    s = n + L
    per_sample = {
        "img_in": 2 * n * p * config.in_channels * d,
        "token_refiner": 2 * L * config.text_dim * d + config.num_refiner_blocks * (2 * L * (4 * d * d + 2 * d * mr)),
        "double_linear": config.num_double_blocks * 2 * s * (4 * d * d + 2 * d * m),
        "single_linear": config.num_single_blocks * 2 * s * (d * (3 * d + m) + (d + m) * d),
        "self_attention": (config.num_double_blocks + config.num_single_blocks) * 4 * s * s * d
        + config.num_refiner_blocks * 4 * L * L * d,
        "cross_attention": 0,
        "final_layer": 2 * n * d * p * config.out_channels,
    }
    return FlopBreakdown({k: float(v) * batch for k, v in per_sample.items()})


def step_flops(spec, width: int, height: int, frames: int, guidance: bool = False, layers: int | None = None) -> FlopBreakdown:
    """One denoising step: one forward (embedded guidance), two with true CFG (`guidance=True`). `layers` limits
    the double and single blocks to that many each (reduced-depth benchmarks)."""
    from dataclasses import replace

    config = spec.transformer
    if layers is not None:
        config = replace(config, num_double_blocks=min(layers, config.num_double_blocks),
                         num_single_blocks=min(layers, config.num_single_blocks))
    return forward_flops(config, tokens(spec, width, height, frames), spec.default("text_len", 256),
                         batch=2 if guidance else 1)


def text_encoder_flops(prompts: int = 1, tokens: int | None = None) -> float:
    """The Llama over `tokens` per prompt (`llama_tokens`; T2V's by default) and CLIP-L."""
    c = LLAMA_8B
    s = llama_tokens() if tokens is None else tokens
    layers = c["layers"] - c["skip"]
    linear = 2 * s * (llama_params() - c["vocab"] * c["dim"])
    attn = 4 * s * s * c["dim"] * layers
    clip = 2 * CLIP_TOKENS * CLIP_L_TEXT_PARAMS
    return float(prompts * (linear + attn + clip))


def video_flops(spec, width: int, height: int, frames: int, steps: int | None = None, guidance: bool = False) -> dict:
    """Transformer and text-encoder FLOPs of a generation (`guidance`: true CFG; the VAE is not modelled)."""
    steps = spec.steps if steps is None else steps
    prompts = 2 if guidance else 1
    text = text_encoder_flops(prompts, llama_tokens(spec.default("text_len", 256), encoder_image_tokens(spec)))
    if spec.task == "i2v":  # each prompt is read with an image (the negative one with a black image)
        text += prompts * llava_vision_flops(**LLAVA_VISION)
    return generation_flops(step_flops(spec, width, height, frames, guidance).total, steps, text)


def activation_bytes(config: HunyuanTransformerConfig, n_tokens: int, batch: int = 1, dtype: str = "bf16",
                     text_len: int = 256, fused_attention: bool = True, attention=None) -> int:
    """Estimated peak activations of one transformer forward (weights excluded). Assumptions: MLX frees a
    buffer after its last consumer, so inside a block one stage is alive at a time; resident are the float32
    residual stream over N + L tokens, the RoPE tables and the input/output latents. The widest stage is a
    single-stream block: its modulated input (float32 and its cast), linear1's output (3d + m wide), q, k, v
    after norm and RoPE, the attention output, the MLP activation (m wide) and linear2's input (d + m wide),
    all in the compute dtype; without a fused attention kernel (MLX on CPU) also the float32 scores and their
    softmax, which `mlx_video.nn.attention` computes in query blocks kept under its budget (1 GiB by default).
    `attention`: the run's sparse self-attention (e.g. radial), which counts its own scores. The allocator's
    cache is not modelled."""
    d, m = config.hidden_size, config.mlp_dim
    s = n_tokens + text_len
    e = dtype_bytes(dtype)
    resident = batch * s * d * 4 * 2 + 2 * n_tokens * config.head_dim * 4 + 2 * batch * n_tokens * config.in_channels * 4
    stage = batch * s * (d * 4 + d * e + (3 * d + m) * e + 5 * d * e + m * e + (d + m) * e)
    if not fused_attention:
        from mlx_video.nn.attention import blocked_score_bytes

        stage += blocked_score_bytes(batch, config.num_heads, s, s, sparse=attention, head_dim=config.head_dim,
                                     itemsize=e)
    return int(resident + stage)


def text_encoding_activation_bytes(prompts: int = 1, tokens: int | None = None) -> int:
    """The Llama forward over its S tokens per prompt (`llama_tokens`; T2V's by default): a few hidden-wide float32
    states, the MLP's intermediate (gate, up, product) and one layer's attention scores (heads x S^2, float32, and
    their softmax)."""
    c = LLAMA_8B
    s = llama_tokens() if tokens is None else tokens
    return int(prompts * s * (6 * c["dim"] + 3 * c["ffn"]) * 4 + 2 * prompts * c["heads"] * s * s * 4)


def decode_activation_bytes(width: int, height: int, frames: int, vae_config: HunyuanVAEConfig = HUNYUAN_VAE,
                            tile_px: tuple[int, int] | None = (256, 256), tile_frames: int | None = 17) -> int:
    """The VAE decoder's working set: about 6 float32 tensors of the top level's width (block_out_channels[0])
    over one tile (`tile_frames` x tile pixels; the whole clip when untiled), the mid block's attention matrix
    over the tile's latent tokens, plus the decoded video held as float32 twice (tiles and the blended result)."""
    th, tw = (height, width) if tile_px is None else (min(height, tile_px[1]), min(width, tile_px[0]))
    tf = frames if tile_frames is None else min(frames, tile_frames)
    c0 = vae_config.block_out_channels[0]
    s, t = vae_config.spatial_compression, vae_config.temporal_compression
    latent_tokens = ((tf - 1) // t + 1) * (th // s) * (tw // s)
    working = 6 * tf * th * tw * c0 * 4 + 2 * latent_tokens * latent_tokens * 4
    return int(working + 2 * frames * height * width * 3 * 4)


def estimate_peak_memory(spec, width: int, height: int, frames: int, dtype: str = "bf16", quantize: str | None = None,
                         group_size: int = DEFAULT_GROUP_SIZE, guidance: bool = False, fused_attention: bool = True,
                         vae_tile: tuple[int, int] | None = (256, 256), vae_tile_frames: int | None = 17,
                         transformer: HunyuanTransformerConfig | None = None, vae_config: HunyuanVAEConfig | None = None,
                         stored: dict | None = None, text_len: int | None = None, attention=None,
                         image_tokens: int | None = None, crop_start: int | None = None, **_ignored) -> PeakEstimate:
    """Peak bytes of each stage, run one after the other with only that stage's weights resident:
    text_encoding (the Llama encoder, then CLIP), denoising (the transformer; `guidance`: true CFG batched),
    decoding (the VAE). `stored`: the bytes the converted components hold ("text_encoder", "text_encoder_2",
    "transformer_expert", "vae"), else computed from the published configs. `image_tokens`, `crop_start`: what the
    Llama reads beside the prompt (`llama_tokens`; by default the published model's)."""
    config = transformer or spec.transformer
    text_len = spec.default("text_len", 256) if text_len is None else text_len
    weights = weight_bytes(spec, dtype, quantize, group_size, config)
    if stored:
        weights.update({k: v for k, v in stored.items() if v})
    n = tokens(spec, width, height, frames, config)
    prompts = 2 if guidance else 1
    stages = {
        "text_encoding": {"weights": max(weights["text_encoder"], weights.get("text_encoder_2", 0)),
                          "activations": text_encoding_activation_bytes(prompts, llama_tokens(
                              text_len, encoder_image_tokens(spec) if image_tokens is None else image_tokens,
                              crop_start))},
        "denoising": {"weights": weights["transformer_expert"],
                      "activations": activation_bytes(config, n, 2 if guidance else 1, dtype, text_len, fused_attention,
                                                      attention)},
        "decoding": {"weights": weights["vae"],
                     "activations": decode_activation_bytes(width, height, frames, vae_config or HUNYUAN_VAE, vae_tile,
                                                            vae_tile_frames)},
    }
    for stage in stages.values():
        stage["total"] = stage["weights"] + stage["activations"]
    peak = max(stages, key=lambda k: stages[k]["total"])
    return PeakEstimate(stages, peak)
