"""RIFE 4.25 weights: the published `flownet.pkl` onto our `IFNet`, and the converted MLX folder.

`flownet.pkl` is `torch.save(flownet.state_dict())` written while the network was wrapped in
DistributedDataParallel, so every key carries a `module.` prefix (`module.block0.conv0.0.0.weight`,
`module.encode.cnn0.weight`). As the reference loaders do, when any key has the prefix only those keys are
used, with the prefix removed. The file is read with the restricted unpickler of `pth.py`: nothing in it is
executed.

Converted folder (what `convert_rife` writes, and `load_rife` also accepts):
    config.json         {"family": "rife", "format_version": 1, "dtype": ..., **IFNetConfig}
    model.safetensors   our parameter names, channels-last
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_video.errors import MlxVideoError
from mlx_video.io.atomic import atomic_dir
from mlx_video.rife import IFNet, IFNetConfig

from mlx_video.convert.pth import open_state_dict
from mlx_video.convert.rules import KeyMap, Rule

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}


def conv2d_to_channels_last(w: mx.array) -> mx.array:
    """torch Conv2d weight (O, I, kH, kW) -> MLX (O, kH, kW, I)."""
    return w.transpose(0, 2, 3, 1)


def conv_transpose2d_to_channels_last(w: mx.array) -> mx.array:
    """torch ConvTranspose2d weight (I, O, kH, kW) -> MLX ConvTranspose2d (O, kH, kW, I)."""
    return w.transpose(1, 2, 3, 0)


def channel_scale(w: mx.array) -> mx.array:
    """ResConv's beta (1, C, 1, 1) -> (C,)."""
    if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
        raise ValueError(f"expected a (1, C, 1, 1) scale, got shape {tuple(w.shape)}")
    return w.reshape(-1)


RIFE_KEYMAP = KeyMap(
    rules=[
        Rule(r"block(\d+)\.conv0\.(\d+)\.0\.weight", r"blocks.\1.conv0.\2.weight", "conv2d"),
        Rule(r"block(\d+)\.conv0\.(\d+)\.0\.bias", r"blocks.\1.conv0.\2.bias"),
        Rule(r"block(\d+)\.convblock\.(\d+)\.conv\.weight", r"blocks.\1.convblock.\2.conv.weight", "conv2d"),
        Rule(r"block(\d+)\.convblock\.(\d+)\.conv\.bias", r"blocks.\1.convblock.\2.conv.bias"),
        Rule(r"block(\d+)\.convblock\.(\d+)\.beta", r"blocks.\1.convblock.\2.beta", "channel_scale"),
        # lastconv is Sequential(ConvTranspose2d, PixelShuffle): only item 0 has weights
        Rule(r"block(\d+)\.lastconv\.0\.weight", r"blocks.\1.lastconv.weight", "conv_transpose2d"),
        Rule(r"block(\d+)\.lastconv\.0\.bias", r"blocks.\1.lastconv.bias"),
        Rule(r"encode\.(cnn[012])\.weight", r"encode.\1.weight", "conv2d"),
        Rule(r"encode\.(cnn[0123])\.bias", r"encode.\1.bias"),
        Rule(r"encode\.cnn3\.weight", r"encode.cnn3.weight", "conv_transpose2d"),
    ],
    transforms={
        "conv2d": conv2d_to_channels_last,
        "conv_transpose2d": conv_transpose2d_to_channels_last,
        "channel_scale": channel_scale,
    },
)


def convert_flownet(path: str | Path) -> dict[str, mx.array]:
    """Read a RIFE `flownet.pkl` and return our parameters (fp32, channels-last) by name."""
    path = Path(path)
    ckpt = open_state_dict(path)
    keys = ckpt.keys()
    prefixed = [k for k in keys if k.startswith("module.")]
    chosen = {k[len("module."):]: k for k in prefixed} if prefixed else {k: k for k in keys}
    unknown = RIFE_KEYMAP.unknown_keys(chosen)
    if unknown:
        raise MlxVideoError(
            f"{path} is not a RIFE 4.25 flownet: it has tensors mlxvid does not know "
            f"({', '.join(sorted(unknown)[:5])}{', ...' if len(unknown) > 5 else ''})"
        )
    weights = {}
    for key, source in chosen.items():
        value = ckpt.get(source)
        if value.dtype != mx.float32:
            value = value.astype(mx.float32)
        new_key, value = RIFE_KEYMAP.apply(key, value)
        weights[new_key] = value
    return weights


def _check_and_load(model: IFNet, weights: dict[str, mx.array], where: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape))
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
        if wrong:
            k = wrong[0]
            shapes = f"{tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
            parts.append(f"{len(wrong)} shape mismatches, e.g. {k} {shapes}")
        raise MlxVideoError(
            f"{where} does not hold RIFE {model.config.version} weights ({'; '.join(parts)}); "
            "only the 4.25 flownet is supported"
        )
    model.load_weights(list(weights.items()))


def find_weights(path: str | Path) -> Path:
    """The checkpoint file or converted folder that `path` names; a folder may also just hold flownet.pkl.

    Raises MlxVideoError when there is nothing usable there.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
            return path
        for name in ("flownet.pkl", "flownet_v4.25.pkl"):
            if (path / name).is_file():
                return path / name
        raise MlxVideoError(
            f"{path} holds no RIFE weights: expected a converted folder ({CONFIG} + {WEIGHTS}) or flownet.pkl"
        )
    raise MlxVideoError(
        f"RIFE weights not found at {path}: pass --rife-weights with the flownet.pkl of Practical-RIFE 4.25 "
        "(or its converted folder)"
    )


def load_rife(path: str | Path, dtype: mx.Dtype = mx.float32) -> IFNet:
    """An `IFNet` with the weights of a `flownet.pkl` (converted in memory) or of a converted folder."""
    path = find_weights(path)
    if path.is_dir():
        try:
            config = json.loads((path / CONFIG).read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise MlxVideoError(f"cannot read {path / CONFIG}: {e}") from None
        if not isinstance(config, dict) or config.get("family") != "rife":
            raise MlxVideoError(f"{path} is not a converted RIFE folder ({CONFIG} names no family 'rife')")
        model = IFNet(IFNetConfig.from_dict(config))
        try:
            weights = mx.load(str(path / WEIGHTS))
        except Exception as e:  # MLX raises plain RuntimeError/ValueError on a broken file
            raise MlxVideoError(f"cannot read {path / WEIGHTS}: {e}") from None
    else:
        model = IFNet()
        weights = convert_flownet(path)
    _check_and_load(model, weights, path)
    model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model


def convert_rife(src: str | Path, dst: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Convert a `flownet.pkl` into a folder that `load_rife` reads without the pickle reader."""
    if dtype not in DTYPES:
        raise MlxVideoError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src = find_weights(src)
    if src.is_dir():
        raise MlxVideoError(f"{src} is already a converted RIFE folder")
    model = IFNet()
    weights = convert_flownet(src)
    _check_and_load(model, weights, src)
    weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    config = {"family": "rife", "format_version": FORMAT_VERSION, "dtype": dtype, **model.config.to_dict()}
    with atomic_dir(dst, overwrite) as tmp:
        mx.save_safetensors(str(tmp / WEIGHTS), weights, metadata={"format": "mlx"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(dst)
