"""HunyuanVideo with `mlxvid convert --quantize`: the family's own low-precision rule (double / single /
token-refiner block linears, the Llama encoder's layers) is applied, the folder loads and generates latents close
to the fp32 conversion's; and the converted folder lists each component once (tokenizers in their own folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from mlx_video.families.hunyuan.planner import LOW_PRECISION_LLAMA, LOW_PRECISION_TRANSFORMER  # noqa: E402
from support.hunyuan import build_tiny_hunyuan_pipeline  # noqa: E402
from support.arrays import rel_err  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset, cinematic"
# widths --group-size 32 divides: 2 heads of 48 (RoPE 8/20/20), MLP 288; Llama 64 wide (4 heads of 16), FFN 96
TRANSFORMER = dict(attention_head_dim=48, rope_axes_dim=(8, 20, 20), text_embed_dim=64)
LLAMA = dict(hidden_size=64, head_dim=16, intermediate_size=96)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan_q")
    build_tiny_hunyuan_pipeline(root / "diffusers", seed=3, transformer_dims=TRANSFORMER, llama_dims=LLAMA)
    main(["convert", str(root / "diffusers"), str(root / "fp32"), "--dtype", "fp32"])
    init = np.random.default_rng(2).standard_normal((1, 6, 3, 4, 6)).astype(np.float32)
    np.save(root / "init.npy", init)
    return root


def _generate(root, model, tag):
    out = root / f"{tag}.npy"
    main(["generate", "--model", str(model), "--prompt", PROMPT, "--size", "48x32", "--frames", "9", "--steps", "3",
          "--init-latents", str(root / "init.npy"), "--save-latents", str(out), "--quiet", "--overwrite"])
    return np.load(out)


def _weights(folder, component):
    index = json.loads((folder / component / "model.safetensors.index.json").read_text())
    return set(index["weight_map"])


def test_components_listed_once_with_tokenizer_folders(tiny):
    manifest = json.loads((tiny / "fp32" / "mlxvid.json").read_text())
    assert sorted(manifest["components"]) == sorted(
        ["transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"])
    assert (tiny / "fp32" / "tokenizer_2" / "tokenizer.json").is_file()
    assert not (tiny / "fp32" / "text_encoder_2" / "tokenizer.json").exists()


@pytest.mark.parametrize("mode,tolerance", [("q8", 2e-2), ("fp8", 1e-1)])
def test_quantized_conversion_generates_close_to_fp32(tiny, mode, tolerance):
    dst = tiny / mode
    main(["convert", str(tiny / "diffusers"), str(dst), "--dtype", "fp32", "--quantize", mode, "--group-size", "32"])
    record = json.loads((dst / "transformer" / "quantization.json").read_text())
    layers = sorted(record["layers"])
    fp32_keys = _weights(tiny / "fp32", "transformer")
    expected = sorted(k[: -len(".weight")] for k in fp32_keys if LOW_PRECISION_TRANSFORMER.fullmatch(k))
    # 2 double blocks x 2 streams x 5 linears, 2 single blocks x 3, 1 refiner block x 5
    assert layers == expected and len(layers) == 2 * 2 * 5 + 2 * 3 + 5
    assert not any(k.startswith(("img_in", "final_layer", "time_in", "txt_in.input_embedder")) for k in layers)
    llama = json.loads((dst / "text_encoder" / "quantization.json").read_text())["layers"]
    assert len(llama) == 3 * 7  # the 3 layers the text path uses, 7 linears each
    assert all(LOW_PRECISION_LLAMA.fullmatch(f"{k}.weight") for k in llama)
    assert not (dst / "text_encoder_2" / "quantization.json").exists() and not (dst / "vae" / "quantization.json").exists()

    ref = _generate(tiny, tiny / "fp32", "fp32")
    ours = _generate(tiny, dst, mode)
    err = rel_err(ours, ref)
    print(f"HunyuanVideo --quantize {mode} vs fp32: relative difference {err:.2e}")
    assert np.isfinite(ours).all()
    assert 1e-6 < err < tolerance  # the low-precision layers were used, and stay close
