"""`mlxvid generate` on bad input: a clear message, exit code 1, no traceback, nothing written, no heavy work."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_video.cli import main
from support.cli import gen, run_error

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_unknown_model_lists_known_ones(capsys):
    err = run_error(capsys, gen("wan9-unknown", "--save-latents", "x.npy"))
    assert "wan9-unknown" in err and "wan2.2-t2v-a14b" in err and "wan2.2-ti2v-5b" in err


def test_registry_model_not_converted_says_what_to_do(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path))
    err = run_error(capsys, gen("wan2.2-ti2v-5b", "--save-latents", str(tmp_path / "x.npy")))
    assert "not converted" in err and "mlxvid convert" in err and "Wan-AI/Wan2.2-TI2V-5B-Diffusers" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--size", "50x32"], "multiples of 16"),
        (["--size", "48"], "WIDTHxHEIGHT"),
        (["--frames", "8"], "4n+1"),
        (["--steps", "0"], "--steps must be a whole number from 1 to 1000"),
        (["--shift", "-1"], "positive"),
    ],
)
def test_bad_settings(capsys, a14b, heavy_work_forbidden, tmp_path, args, needle):
    root, _ = a14b
    err = run_error(capsys, gen(root / "mlx", "--save-latents", str(tmp_path / "x.npy"), *args))
    assert needle in err
    assert not (tmp_path / "x.npy").exists()


def test_init_latents_of_wrong_shape(capsys, a14b, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    np.save(tmp_path / "bad.npy", np.zeros((1, 4, 3, 4, 5), np.float32))
    err = run_error(capsys, gen(root / "mlx", "--size", "48x32", "--frames", "9", "--init-latents",
                                str(tmp_path / "bad.npy"), "--save-latents", str(tmp_path / "x.npy")))
    assert "(1, 4, 3, 4, 6)" in err and "(1, 4, 3, 4, 5)" in err


def test_init_latents_not_finite(capsys, a14b, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    bad = np.zeros((1, 4, 3, 4, 6), np.float32)
    bad[0, 0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    err = run_error(capsys, gen(root / "mlx", "--size", "48x32", "--frames", "9", "--init-latents",
                                str(tmp_path / "nan.npy"), "--save-latents", str(tmp_path / "x.npy")))
    assert "NaN" in err


def test_existing_output_is_not_clobbered(capsys, a14b, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    (tmp_path / "x.npy").write_bytes(b"precious")
    err = run_error(capsys, gen(root / "mlx", "--save-latents", str(tmp_path / "x.npy")))
    assert "--overwrite" in err
    assert (tmp_path / "x.npy").read_bytes() == b"precious"


def test_output_suffix(capsys, a14b, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    assert ".mp4" in run_error(capsys, gen(root / "mlx", "--output", str(tmp_path / "x.avi")))
    # without --output a default name is taken (tests/test_production.py); nothing is written on an error


def test_diffusers_folder_is_sent_to_convert(capsys, a14b, tmp_path):
    root, _ = a14b
    err = run_error(capsys, gen(root / "diffusers", "--save-latents", str(tmp_path / "x.npy")))
    assert "mlxvid convert" in err


def test_folder_missing_a_component_names_the_file(capsys, a14b, tmp_path):
    root, _ = a14b
    broken = tmp_path / "broken"
    shutil.copytree(root / "mlx", broken)
    (broken / "transformer_2" / "model.safetensors.index.json").unlink()
    err = run_error(capsys, gen(broken, "--save-latents", str(tmp_path / "x.npy")))
    assert "transformer_2/model.safetensors.index.json" in err and "mlxvid convert" in err


def test_non_finite_latents_stop_the_run_at_the_first_step(capsys, a14b, tmp_path):
    root, _ = a14b
    broken = tmp_path / "nan-weights"
    shutil.copytree(root / "mlx", broken)
    shard = next((broken / "transformer").glob("model-*.safetensors"))
    weights = mx.load(str(shard))
    weights["time_projection.bias"] = mx.full(weights["time_projection.bias"].shape, float("nan"))
    mx.save_safetensors(str(shard), weights)
    out = tmp_path / "x.npy"
    err = run_error(capsys, gen(broken, "--size", "48x32", "--frames", "9", "--steps", "5",
                                "--save-latents", str(out)))
    assert "step 1/5" in err and "NaN" in err and "high-noise expert" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_models_lists_registry(capsys):
    main(["models"])
    out = capsys.readouterr().out
    from mlx_video.registry import MODELS

    for model_id in MODELS:
        assert model_id in out
    assert "steps 40, shift 12.0" in out


def test_models_names_the_super_resolution_stages(capsys):
    """Each HunyuanVideo 1.5 base model's entry names its --upscale choice and the SR model it runs (the release's
    480p models to 720p, the 720p ones to 1080p); other models and the SR models themselves name none."""
    main(["models"])
    out = capsys.readouterr().out
    blocks = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = blocks.setdefault(line.split()[0], [])
        elif line.strip():
            current.append(line.strip())
    stage = "super-resolution: --upscale {} runs hunyuanvideo-1.5-{}-sr-distilled after the base run"
    for model_id, resolution in (("hunyuanvideo-1.5-480p-t2v", "720p"), ("hunyuanvideo-1.5-480p-i2v-step-distilled",
                                                                         "720p"), ("hunyuanvideo-1.5-720p-t2v", "1080p"),
                                 ("hunyuanvideo-1.5-720p-i2v-distilled", "1080p")):
        assert stage.format(resolution, resolution) in blocks[model_id], model_id
    for model_id in ("wan2.2-ti2v-5b", "hunyuanvideo-t2v", "mochi-1-preview", "hunyuanvideo-1.5-720p-sr-distilled"):
        assert not any(line.startswith("super-resolution") for line in blocks[model_id]), model_id
    main(["models", "--json"])
    listing = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert listing["hunyuanvideo-1.5-480p-i2v"]["upscale"] == [{"upscale": "720p",
                                                                "model": "hunyuanvideo-1.5-720p-sr-distilled"}]
    assert listing["wan2.2-t2v-a14b"]["upscale"] == []


def test_sidecar_records_settings(a14b, tmp_path):
    root, _ = a14b
    out = tmp_path / "lat.npy"
    main(gen(root / "mlx", "--size", "48x32", "--frames", "5", "--steps", "2", "--seed", "3", "--save-latents", str(out)))
    sidecar = json.loads(out.with_suffix(".json").read_text())
    s = sidecar["settings"]
    assert (s["seed"], s["steps"], s["width"], s["height"], s["frames"]) == (3, 2, 48, 32, 5)
    assert s["guidance"] == 4.0 and s["guidance_2"] == 3.0 and s["shift"] == 12.0  # the registry's defaults
    assert "denoising" in sidecar["timings"] and sidecar["versions"]["mlx"] == mx.__version__
    # the same seed gives the same latents
    out2 = tmp_path / "lat2.npy"
    main(gen(root / "mlx", "--size", "48x32", "--frames", "5", "--steps", "2", "--seed", "3", "--save-latents", str(out2)))
    np.testing.assert_array_equal(np.load(out), np.load(out2))


def test_download_fetches_only_pipeline_files_and_converts(a14b, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    root, _ = a14b
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(root / "diffusers")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path))
    main(["download", "wan2.2-t2v-a14b", "--dtype", "fp32"])
    assert calls[0][0] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert "transformer_2/*" in calls[0][1] and "image_encoder/*" not in calls[0][1]
    assert (tmp_path / "models" / "wan2.2-t2v-a14b" / "mlxvid.json").is_file()
    # generate now finds it by id
    main(gen("wan2.2-t2v-a14b", "--size", "48x32", "--frames", "5", "--steps", "1",
             "--save-latents", str(tmp_path / "x.npy")))
    assert (tmp_path / "x.npy").is_file()
    # a second download leaves the converted folder alone and succeeds, so the README's command can be re-run
    capsys.readouterr()
    calls.clear()
    main(["download", "wan2.2-t2v-a14b"])
    assert "already converted" in capsys.readouterr().out and not calls


def test_download_failure_says_what_to_do(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path))
    err = run_error(capsys, ["download", "wan2.2-ti2v-5b"])
    assert "network unreachable" in err and "mlxvid convert" in err


def test_memory_preflight_refuses_a_run_that_will_not_fit(capsys, a14b, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    err = run_error(capsys, gen(root / "mlx", "--size", "48x32", "--frames", "9", "--max-memory", "0.0001",
                                "--output", str(tmp_path / "v.mp4")))
    assert "MiB at its peak" in err and "--quantize q8" in err and "--max-memory" in err
    assert not (tmp_path / "v.mp4").exists()


def test_memory_estimate_follows_the_work(a14b):
    from mlx_video.families.wan.pipeline import WanPipeline, WanSettings

    pipe = WanPipeline.from_pretrained(str(a14b[0] / "mlx"))
    small = pipe.estimate_memory(pipe.resolve(WanSettings("x", width=48, height=32, frames=9)))
    large = pipe.estimate_memory(pipe.resolve(WanSettings("x", width=96, height=64, frames=17)))
    for stage in ("text_encoding", "denoising", "decoding"):
        assert small["stages"][stage] > 0
    assert small["stages"]["text_encoding"] == large["stages"]["text_encoding"]
    assert large["stages"]["denoising"] > small["stages"]["denoising"]
    assert large["stages"]["decoding"] > small["stages"]["decoding"]
    # the weights as stored are part of it
    assert small["stages"]["denoising"] > pipe.component_bytes("transformer")


def test_run_summary_is_printed_before_the_work(a14b, tmp_path, capsys):
    root, _ = a14b
    main(["generate", "--model", str(root / "mlx"), "--prompt", "a cat", "--size", "48x32", "--frames", "5",
          "--steps", "1", "--seed", "9", "--save-latents", str(tmp_path / "x.npy")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wan2.2-t2v-a14b (float32): 48x32, 5 frames at 16 fps, 1 steps (unipc, shift 12.0), "
                             "guidance 4.0 / 3.0 (high / low noise), seed 9; estimated peak")
