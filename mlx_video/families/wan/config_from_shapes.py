"""Configurations read from tensor shapes (single-file checkpoints carry no config.json), and the published
sizes a checkpoint is compared with to say which model it looks like."""

from __future__ import annotations

import math

from mlx_video.errors import MlxVideoError
from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.text_encoders.umt5 import UMT5Config

from mlx_video.convert.formats import count_blocks

# Key names of the tensors whose shapes give a transformer's dimensions, per naming.
_TRANSFORMER_KEYS = {
    "official": {
        "patch": "patch_embedding.weight",
        "head": "head.head.weight",
        "ffn": "blocks.0.ffn.0.weight",
        "text": "text_embedding.0.weight",
        "time": "time_embedding.0.weight",
        "blocks": r"blocks\.(\d+)\.",
    },
    "diffusers": {
        "patch": "patch_embedding.weight",
        "head": "proj_out.weight",
        "ffn": "blocks.0.ffn.net.0.proj.weight",
        "text": "condition_embedder.text_embedder.linear_1.weight",
        "time": "condition_embedder.time_embedder.linear_1.weight",
        "blocks": r"blocks\.(\d+)\.",
    },
}

# Wan transformer sizes that exist but are not (or not all) registry models: name -> distinguishing numbers.
OTHER_WAN_SIZES = {
    "Wan 2.1 T2V-1.3B": dict(dim=1536, ffn_dim=8960, num_layers=30, in_channels=16),
    "Wan 2.1 I2V-14B (without its CLIP image embedding)": dict(dim=5120, ffn_dim=13824, num_layers=40, in_channels=36),
}

SIZE_FIELDS = ("dim", "ffn_dim", "num_layers", "in_channels", "out_channels", "patch_size", "text_dim", "freq_dim")


def infer_transformer_config(shapes: dict, naming: str, num_heads: int | None = None) -> WanTransformerConfig:
    """Dimensions from shapes. The head count is not in the shapes: `num_heads` gives it, else dim / 128
    (every published Wan transformer has 128-wide heads), else it is left 0 (unknown)."""
    names = _TRANSFORMER_KEYS[naming]

    def need(role):
        s = shapes.get(names[role])
        if s is None:
            raise MlxVideoError(f"the transformer checkpoint lacks {names[role]}, which every Wan transformer has")
        return s

    patch_w = need("patch")
    if len(patch_w) != 5:
        raise MlxVideoError(f"{names['patch']} has shape {list(patch_w)}; a Wan patch embedding is a 3D convolution")
    dim, in_channels, patch = patch_w[0], patch_w[1], tuple(patch_w[2:])
    head = need("head")
    volume = math.prod(patch)
    if head[0] % volume:
        raise MlxVideoError(f"{names['head']} has {head[0]} outputs, not a multiple of the patch volume {volume}")
    if num_heads is None:
        num_heads = 0 if dim % 128 else dim // 128
    return WanTransformerConfig(
        dim=dim,
        ffn_dim=need("ffn")[0],
        freq_dim=need("time")[1],
        text_dim=need("text")[1],
        num_heads=num_heads,
        num_layers=count_blocks(shapes, names["blocks"]),
        in_channels=in_channels,
        out_channels=head[0] // volume,
        patch_size=patch,
    )


def transformer_config_from_official(config_json: dict) -> WanTransformerConfig:
    """Our config from an official `WanModel` config.json (high_noise_model/config.json and the like)."""
    model_type = config_json.get("model_type", "t2v")
    if model_type not in ("t2v", "i2v", "ti2v", "s2v"):
        raise ValueError(f"model_type {model_type!r} (Wan 2.2 models are t2v, i2v, ti2v or s2v)")
    if not config_json.get("qk_norm", True) or not config_json.get("cross_attn_norm", True):
        raise ValueError("qk_norm and cross_attn_norm must be true, as in every Wan 2.2 model")
    if tuple(config_json.get("window_size", (-1, -1))) != (-1, -1):
        raise ValueError(f"window_size {config_json['window_size']} (local attention) is not supported")
    d = WanTransformerConfig()
    in_dim = config_json.get("in_dim", d.in_channels)
    return WanTransformerConfig(
        dim=config_json.get("dim", d.dim),
        ffn_dim=config_json.get("ffn_dim", d.ffn_dim),
        freq_dim=config_json.get("freq_dim", d.freq_dim),
        text_dim=config_json.get("text_dim", d.text_dim),
        text_len=config_json.get("text_len", d.text_len),
        num_heads=config_json.get("num_heads", d.num_heads),
        num_layers=config_json.get("num_layers", d.num_layers),
        in_channels=in_dim,
        out_channels=config_json.get("out_dim") or in_dim,
        patch_size=tuple(config_json.get("patch_size", d.patch_size)),
        eps=config_json.get("eps", d.eps),
    )


def describe_transformer(cfg: WanTransformerConfig) -> str:
    return (
        f"dim {cfg.dim}, {cfg.num_layers} layers, ffn {cfg.ffn_dim}, {cfg.in_channels} channels in / "
        f"{cfg.out_channels} out"
    )


def same_size(a: WanTransformerConfig, b: WanTransformerConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in SIZE_FIELDS)


def size_differences(got: WanTransformerConfig, want: WanTransformerConfig) -> str:
    return ", ".join(f"{f} {getattr(got, f)} (expected {getattr(want, f)})" for f in SIZE_FIELDS if getattr(got, f) != getattr(want, f))


def which_wan(cfg: WanTransformerConfig, models) -> str | None:
    """The published model whose transformer has these dimensions, if any (a VACE model only for a transformer
    with the VACE context blocks)."""
    vace = getattr(cfg, "vace_layers", None) is not None
    for spec in models.values():
        if spec.family == "wan" and (spec.task == "vace") == vace and same_size(cfg, spec.transformer):
            return f"{spec.id}"
    for name, numbers in OTHER_WAN_SIZES.items():
        if all(getattr(cfg, k) == v for k, v in numbers.items()):
            return name
    return None


def infer_umt5_config(shapes: dict, naming: str) -> UMT5Config:
    if naming == "official":
        embed, q, bias, ffn = (
            "token_embedding.weight",
            "blocks.0.attn.q.weight",
            "blocks.0.pos_embedding.embedding.weight",
            "blocks.0.ffn.fc1.weight",
        )
        layers = count_blocks(shapes, r"blocks\.(\d+)\.")
    else:
        embed = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
        q = "encoder.block.0.layer.0.SelfAttention.q.weight"
        bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ffn = "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"
        layers = count_blocks(shapes, r"encoder\.block\.(\d+)\.")
    for key in (embed, q, bias, ffn):
        if key not in shapes:
            raise MlxVideoError(f"the text encoder checkpoint lacks {key}, which every UMT5 encoder has")
    vocab, dim = shapes[embed]
    buckets, heads = shapes[bias]
    attn_dim = shapes[q][0]
    if attn_dim % heads:
        raise MlxVideoError(f"the text encoder's attention width {attn_dim} does not split into {heads} heads")
    return UMT5Config(
        vocab_size=vocab,
        dim=dim,
        head_dim=attn_dim // heads,
        num_heads=heads,
        ffn_dim=shapes[ffn][0],
        num_layers=layers,
        num_buckets=buckets,
    )
