"""The family-neutral house: self-describing model folders, the shared loop's guidance strategies, the Python
API for image conditioning, converting a single file on top of a diffusers folder, and signature scoring."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_video.cli import main  # noqa: E402
from mlx_video.errors import MlxVideoError  # noqa: E402
from mlx_video.pipelines.base import GenerationSettings, Pipeline  # noqa: E402
from mlx_video.pipelines.loop import guidance_batched, guidance_sequential  # noqa: E402

PROMPT = "a corgi surfs a wave at sunset"


def _finetune(a14b, tmp_path, drop=()):
    """A copy of the converted tiny A14B folder renamed to an id the registry does not know."""
    root, _ = a14b
    folder = tmp_path / "my-wan-finetune"
    shutil.copytree(root / "mlx", folder)
    manifest = json.loads((folder / "mlxvid.json").read_text())
    manifest["model"] = "my-wan-finetune"
    manifest["defaults"].update(steps=3, guidance=2.0, guidance_2=1.5, shift=7.0)
    for name in drop:
        manifest["defaults"].pop(name)
    (folder / "mlxvid.json").write_text(json.dumps(manifest))
    return folder


def test_unknown_model_id_generates_with_its_manifest_defaults(a14b, tmp_path):
    folder = _finetune(a14b, tmp_path)
    init = np.random.default_rng(0).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--size", "48x32", "--frames", "9",
            "--init-latents", str(tmp_path / "init.npy"), "--quiet"]
    main(args + ["--save-latents", str(tmp_path / "a.npy")])
    record = json.loads((tmp_path / "a.json").read_text())["settings"]
    assert record["model"] == "my-wan-finetune"
    assert (record["steps"], record["guidance"], record["guidance_2"], record["shift"]) == (3, 2.0, 1.5, 7.0)
    # the same run with the defaults spelled out gives the same latents: the manifest's defaults were used
    main(args + ["--steps", "3", "--guidance", "2", "--guidance-2", "1.5", "--shift", "7",
                 "--save-latents", str(tmp_path / "b.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    # and the registry's own defaults (40 steps, shift 12) would have given other latents
    main(args + ["--steps", "3", "--shift", "12", "--save-latents", str(tmp_path / "c.npy")])
    assert not np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))


def test_folder_missing_a_default_says_which_and_how(a14b, tmp_path, capsys):
    folder = _finetune(a14b, tmp_path, drop=("steps",))
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "--prompt", PROMPT, "--size", "48x32", "--frames", "9",
              "--save-latents", str(tmp_path / "x.npy"), "--quiet"])
    err = capsys.readouterr().err
    assert "no default steps" in err and "--steps N" in err
    # passing it is enough
    main(["generate", "--model", str(folder), "--prompt", PROMPT, "--size", "48x32", "--frames", "9", "--steps", "1",
          "--save-latents", str(tmp_path / "x.npy"), "--quiet"])


def test_python_api_image_array_without_settings_image(tmp_path):
    from support.wan import build_tiny_wan_pipeline

    build_tiny_wan_pipeline(tmp_path / "diffusers", two_experts=True, shift=5.0, image_to_video=True)
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32"])
    pipe = Pipeline.from_pretrained(str(tmp_path / "mlx"))
    image = np.random.default_rng(0).uniform(-1, 1, (32, 48, 3)).astype(np.float32)
    result = pipe.generate(GenerationSettings(PROMPT, width=48, height=32, frames=5, steps=2), image=image)
    assert result.latents.shape == (1, 4, 2, 4, 6) and np.isfinite(result.latents).all()
    with pytest.raises(MlxVideoError, match="--image"):
        pipe.generate(GenerationSettings(PROMPT, width=48, height=32, frames=5, steps=2))


def test_sequential_guidance_equals_batched():
    rng = np.random.default_rng(1)
    w = mx.array(rng.standard_normal((6, 6)).astype(np.float32))

    def forward(x, t, cond):  # batch-independent, nonlinear in every input
        return mx.tanh(x @ w + cond[0][:, None, :] * t[:, None, None]) * cond[1][:, None, :]

    x = mx.array(rng.standard_normal((1, 5, 6)).astype(np.float32))
    t = mx.array([0.7])
    cond = (mx.array(rng.standard_normal((1, 6)).astype(np.float32)), mx.array(rng.standard_normal((1, 6)).astype(np.float32)))
    uncond = (mx.array(rng.standard_normal((1, 6)).astype(np.float32)), mx.array(rng.standard_normal((1, 6)).astype(np.float32)))
    a = np.array(guidance_batched(forward, x, t, cond, uncond, 4.5))
    b = np.array(guidance_sequential(forward, x, t, cond, uncond, 4.5))
    # independent: u + s (c - u) from two plain calls, in float64
    c, u = (np.array(forward(x, t, k)).astype(np.float64) for k in (cond, uncond))
    np.testing.assert_allclose(a, u + 4.5 * (c - u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_guidance_mode_sequential_end_to_end(a14b, tmp_path):
    root, _ = a14b
    init = np.random.default_rng(2).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    out = {}
    for mode in ("batched", "sequential"):
        main(["generate", "--model", str(root / "mlx"), "--prompt", PROMPT, "--size", "48x32", "--frames", "9",
              "--steps", "3", "--init-latents", str(tmp_path / "init.npy"), "--guidance-mode", mode,
              "--save-latents", str(tmp_path / f"{mode}.npy"), "--quiet"])
        out[mode] = np.load(tmp_path / f"{mode}.npy")
    err = float(np.linalg.norm(out["batched"] - out["sequential"]) / np.linalg.norm(out["batched"]))
    assert err < 1e-5


def test_single_file_over_a_diffusers_folder_keeps_its_config(tmp_path):
    """A transformer file with 4 heads of 20 (80 wide): its shapes cannot tell 4x20 from 2x40 or 1x80, so the
    head count must come from DIFFUSERS_DIR/transformer/config.json."""
    from safetensors.torch import save_file
    from support.wan import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(tmp_path / "diffusers", two_experts=False, shift=5.0, heads=4, head_dim=20)
    state = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(state, str(tmp_path / "finetuned_transformer.safetensors"))
    main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "mlx"), "--dtype", "fp32",
          "--transformer", str(tmp_path / "finetuned_transformer.safetensors")])
    config = json.loads((tmp_path / "mlx" / "transformer" / "config.json").read_text())
    assert config["num_heads"] == 4 and config["dim"] == 80


def test_signatures_are_scored_not_first_match():
    from mlx_video.convert.formats import classify

    # a Wan VAE in diffusers names is recognised; the same top-level names without Wan's fused mid-block
    # attention (a HunyuanVideo-style VAE) are not called a Wan VAE
    wan_vae = {"encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight", "quant_conv.weight",
               "encoder.mid_block.attentions.0.to_qkv.weight"}
    assert classify(wan_vae).description.startswith("a Wan VAE")
    other = {"encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight",
             "encoder.mid_block.attentions.0.to_q.weight"}
    assert classify(other).kind is None or "Wan" not in classify(other).description


def test_folder_config_of_the_wrong_type_names_file_field_and_type(a14b, tmp_path, capsys):
    folder = _finetune(a14b, tmp_path)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_layers": str(config["num_layers"])}))
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "--prompt", PROMPT, "--size", "48x32", "--frames", "9",
              "--save-latents", str(tmp_path / "x.npy"), "--quiet"])
    err = capsys.readouterr().err
    assert str(config_path) in err and "'num_layers'" in err and "expected an integer" in err
    assert not (tmp_path / "x.npy").exists()
