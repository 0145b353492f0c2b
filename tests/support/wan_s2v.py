"""Wan2.2-S2V recorded from the official code (tests/fixtures/s2v/make_*.py): the tiny transformer's cases
(`Fixture`, run in our layout), the tiny pipeline's run and its release folder, a voice track."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_video.convert.rules import convert_weights
from mlx_video.families.wan.s2v_keys import OFFICIAL_S2V_TRANSFORMER, s2v_config_from_official
from mlx_video.families.wan.s2v_model import WanS2VTransformer

# ---- the recorded transformer cases ----
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "s2v"


class Fixture:
    def __init__(self, name: str):
        arrays, meta = mx.load(str(FIXTURES / f"s2v_{name}.safetensors"), return_metadata=True)
        self.arrays = arrays
        self.official_config = json.loads(meta["config"])
        self.cases = json.loads(meta["cases"])
        scales = json.loads(meta["scales"])
        state = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
        self.state = {k: v.astype(mx.float32) * scales[k] for k, v in state.items()}

    def inputs(self, case: str) -> dict:
        """The case's inputs in the official layouts (its own, else those of the case it was derived from)."""
        spec = self.cases[case]
        base = {} if spec["inputs_from"] is None else self.inputs(spec["inputs_from"])
        prefix = f"{case}/in/"
        own = {k[len(prefix):]: v.astype(mx.float32) for k, v in self.arrays.items() if k.startswith(prefix)}
        return {**base, **own}

    def model(self) -> WanS2VTransformer:
        config = s2v_config_from_official(self.official_config)
        model = WanS2VTransformer(config)
        weights = convert_weights(OFFICIAL_S2V_TRANSFORMER, self.state)
        expected = dict(tree_flatten(model.parameters()))
        assert set(weights) == set(expected)
        assert all(weights[k].shape == expected[k].shape for k in weights)
        model.update(tree_unflatten(list(weights.items())))
        return model


def ours_layout(inputs: dict) -> dict:
    """Official channels-first tensors -> our keyword arguments (channels-last, audio (B, F, layers, dim))."""
    to_last = lambda a: a.transpose(0, 2, 3, 4, 1)  # noqa: E731
    return dict(
        x=to_last(inputs["x"]), timestep=inputs["t"], context=inputs["context"],
        ref_latents=to_last(inputs["ref"]), motion_latents=to_last(inputs["motion"]),
        cond_latents=to_last(inputs["cond"]), audio=inputs["audio"].transpose(0, 3, 1, 2),
    )


def run(model, args: dict, drop_motion: bool) -> mx.array:
    args = dict(args)
    out = model(args.pop("x"), args.pop("timestep"), args.pop("context"), drop_motion=drop_motion, **args)
    return out.transpose(0, 4, 1, 2, 3)  # back to (B, C, T, H, W)


# ---- the recorded official pipeline, a voice track ----
S2V_FIXTURE = FIXTURES / "pipeline_reference.safetensors"


def write_wav(path: Path, seconds: float, rate: int = 22050, amplitude: float = 0.3, freq: float = 220.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    samples = (amplitude * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))) if amplitude else 0 * t
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.asarray(samples) * 32767).astype(np.int16).tobytes())
    return path


def s2v_reference():
    """The tiny S2V model and run recorded from the official code (tests/fixtures/s2v/make_pipeline_reference.py):
    (tensors, model config, settings, wav2vec2 layers)."""
    from safetensors import safe_open

    with safe_open(str(S2V_FIXTURE), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return tensors, json.loads(meta["model_config"]), json.loads(meta["settings"]), int(meta["audio_layers"])


def build_s2v_release(root: Path, reference) -> Path:
    """The recorded official S2V checkpoint in the release layout (plus a tiny UMT5, tokenizer and wav2vec2) under
    `root`, converted to `root/mlx`; returns `root`."""
    import torch
    import transformers
    from safetensors.numpy import save_file as save_numpy

    from mlx_video.cli import main
    from support.wan import randomize_, train_spiece
    from support.wan_checkpoints import official_umt5

    tensors, config, _, audio_layers = reference
    src = root / "Wan2.2-S2V-14B"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "WanModel_S2V", **config}))
    save_numpy({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
              str(src / "diffusion_pytorch_model.safetensors"))
    torch.save({k[len("vae."):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("vae.")},
               src / "Wan2.1_VAE.pth")
    torch.manual_seed(0)
    t5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=64, d_model=config["text_dim"], d_kv=7, d_ff=40, num_layers=1, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0)).eval()
    randomize_(t5, 3, scale=0.5)
    torch.save(official_umt5(t5.state_dict()), src / "models_t5_umt5-xxl-enc-bf16.pth")
    (src / "google" / "umt5-xxl").mkdir(parents=True)
    train_spiece(src / "google" / "umt5-xxl" / "spiece.model")
    w2v = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        hidden_size=config["audio_dim"], num_hidden_layers=audio_layers - 1, num_attention_heads=2,
        intermediate_size=40, conv_dim=(8,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=11,
        do_stable_layer_norm=True, feat_extract_norm="layer", feat_extract_activation="gelu", hidden_act="gelu",
    )).eval()
    w2v.save_pretrained(src / "wav2vec2-large-xlsr-53-english")
    main(["convert", str(src), str(root / "mlx"), "--dtype", "fp32"])
    return root
