"""The cost models (mlx_video.cost, mlx_video.families.wan.cost_model) and the benchmark harnesses (benchmarks/harness.py),
on tiny configs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

import sys
from pathlib import Path

from mlx_video import cost
from mlx_video.families.wan import cost_model as flops
from mlx_video.families.wan.config import WanTransformerConfig
from mlx_video.families.wan.vae import WAN21_VAE, WAN22_VAE, WanVAEConfig
from mlx_video.registry import MODELS, get_spec

TINY = WanTransformerConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=4, num_layers=2,
                            in_channels=16, out_channels=16)
TINY_VAE = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                        latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
TINY_WIDTH = {k: v for k, v in TINY.to_dict().items() if k != "num_layers"}
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness as bench  # noqa: E402

SYSTEM_FIELDS = {"date", "command", "device", "os", "mlx", "torch", "diffusers", "blas", "cpu_count"}


def _read(path):
    record = json.loads(path.read_text())
    assert SYSTEM_FIELDS <= set(record["system"])
    return record


# ---- the FLOP model against figures worked out by hand from the published configs ----
# (token counts, PFLOP per forward and bf16 sizes of Wan-Video/Wan2.2 wan/configs/*: linear layers 2 * tokens * params,
# attention 4 * N^2 * d per layer)


@pytest.mark.parametrize("model_id, size, frames, n_tokens, pflop", [
    ("wan2.2-t2v-a14b", (832, 480), 81, 32_760, 1.68),
    ("wan2.2-t2v-a14b", (1280, 720), 81, 75_600, 6.52),
    ("wan2.2-ti2v-5b", (1280, 704), 121, 27_280, 0.52),
])
def test_published_tokens_and_flops(model_id, size, frames, n_tokens, pflop):
    spec = get_spec(model_id)
    assert flops.tokens(spec, *size, frames) == n_tokens
    per_forward = flops.step_flops(spec, *size, frames, guidance=False).total / 1e15
    assert per_forward == pytest.approx(pflop, rel=0.01)
    assert flops.step_flops(spec, *size, frames).total == pytest.approx(2 * per_forward * 1e15)


def test_published_720p_attention_share():
    spec = get_spec("wan2.2-t2v-a14b")
    fb = flops.step_flops(spec, 1280, 720, 81, guidance=False)
    assert fb.components["self_attention"] / 1e15 == pytest.approx(4.7, rel=0.01)  # by hand: self-attention about 4.7 of 6.52


def test_published_parameter_counts():
    def total(cfg):
        return sum(c.total for c in flops.transformer_params(cfg).values())

    assert total(get_spec("wan2.2-t2v-a14b").transformer) / 1e9 == pytest.approx(14.288, abs=0.001)
    assert total(get_spec("wan2.2-ti2v-5b").transformer) / 1e9 == pytest.approx(5.000, abs=0.001)
    assert flops.umt5_params() / 1e9 == pytest.approx(5.681, abs=0.001)
    assert flops.vae_params(WAN21_VAE) / 1e6 == pytest.approx(126.9, abs=0.1)
    assert flops.vae_params(WAN22_VAE) / 1e6 == pytest.approx(704.7, abs=0.1)


def test_parameter_formula_matches_the_module():
    from mlx.utils import tree_flatten

    from mlx_video.families.wan.transformer import WanTransformer

    for cfg in (TINY, replace(get_spec("wan2.2-ti2v-5b").transformer, num_layers=1)):
        counted = sum(v.size for _, v in tree_flatten(WanTransformer(cfg).parameters()))  # lazy: nothing is allocated
        assert counted == sum(c.total for c in flops.transformer_params(cfg).values())


def test_weight_bytes_and_quantization():
    spec = get_spec("wan2.2-t2v-a14b")
    bf16 = flops.weight_bytes(spec, "bf16")
    assert bf16["transformer_expert"] / 1e9 == pytest.approx(28.6, abs=0.05)  # by hand: 28.6 GB each
    assert bf16["transformer_all_experts"] == 2 * bf16["transformer_expert"]
    q4 = flops.weight_bytes(spec, "bf16", "q4")
    assert 0.25 < q4["transformer_expert"] / bf16["transformer_expert"] < 0.35
    assert q4["text_encoder"] == bf16["text_encoder"]  # never quantized


# ---- the FLOP model against torch's FlopCounterMode (diffusers' model, meta device) ----


@pytest.mark.parametrize("model_id, size, frames, layers, width, guidance, rel", [
    ("wan2.2-t2v-a14b", (64, 64), 5, 2, "tiny", True, 1e-3),  # latent 2x8x8, batch 2: in fact the same count
    ("wan2.2-t2v-a14b", (256, 256), 9, 2, None, True, 1e-3),  # real widths, latent 3x32x32: 768 tokens
    # latent 2x16x24, batch 1: the cost model counts a time embedding per latent frame (TI2V's per-frame
    # timesteps, as the pipeline runs it), the reference's step gets one timestep: 0.13% more
    ("wan2.2-ti2v-5b", (384, 256), 5, 1, None, False, 2e-3),
])
def test_flops_match_torch_flop_counter(model_id, size, frames, layers, width, guidance, rel):
    """The step case's FLOPs (the family cost model) against torch's count of its reference on the meta device."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    case = bench.step_case(model_id, size, frames, layers, width=TINY_WIDTH if width else None, guidance=guidance)
    counted = bench.torch_flop_count(case.reference)["total"]
    assert case.flops == pytest.approx(counted, rel=rel)


# HunyuanVideo 1.5's step at two tiny widths (the projections' hidden 2048 of byt5_in stays): CFG batch 2 with a
# quoted glyph (T2V: the reference's 729 all-zero image tokens, masked), and I2V with its condition and image tokens
HY15_WIDTHS = {
    "hunyuanvideo-1.5-720p-t2v": {"num_attention_heads": 2, "attention_head_dim": 20, "rope_axes_dim": [4, 8, 8],
                                  "text_embed_dim": 24, "text_embed_2_dim": 12, "image_embed_dim": 16},
    "hunyuanvideo-1.5-480p-i2v": {"num_attention_heads": 3, "attention_head_dim": 24, "rope_axes_dim": [8, 8, 8],
                                  "text_embed_dim": 20, "text_embed_2_dim": 16, "image_embed_dim": 12},
}


def _trimmed(reference, lengths):
    """The reference's inputs cut to the Qwen / ByT5 columns some sample uses and the image tokens ours keeps."""
    x = dict(reference.inputs)
    for name, keep in (("encoder_hidden_states", "qwen"), ("encoder_attention_mask", "qwen"),
                       ("encoder_hidden_states_2", "glyph"), ("encoder_attention_mask_2", "glyph"),
                       ("image_embeds", "image")):
        x[name] = x[name][:, : lengths[keep]]
    return replace(reference, inputs=x)


@pytest.mark.parametrize("model_id", list(HY15_WIDTHS))
def test_hunyuan15_flops_match_torch_flop_counter(model_id):
    """diffusers' HunyuanVideo15Transformer3DModel branches on its inputs' values, so torch counts it on the CPU
    (harness.torch_flop_count): at the pipeline's padded 1000 / 256 / 729 text slots it runs, the cost model at
    those lengths; on the columns ours keeps (the step case's FLOPs: the refiner over the used Qwen columns, the
    joint sequence of the most valid tokens of a sample), the step case's count."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    case = bench.step_case(model_id, (48, 32), 5, 1, width=HY15_WIDTHS[model_id])
    padded = bench.torch_flop_count(case.reference)
    assert padded["device"] == "cpu" and case.batch == 2
    assert case.reference.flops == pytest.approx(padded["total"], rel=1e-3)
    kept = bench.torch_flop_count(_trimmed(case.reference, case.info["text_lengths"]))
    assert case.flops == pytest.approx(kept["total"], rel=1e-3) and case.flops < padded["total"]


def test_hunyuan15_vs_reference(tmp_path):
    """The step-distilled I2V step through ours and diffusers' (the same weights through DIFFUSERS_TRANSFORMER): one
    pass with the image's condition latents and tokens and MeanFlow's second timestep. (The T2V step with CFG and
    a glyph runs against diffusers in the GPU check's dry run, tests/test_gpu_check.py.)"""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    r = bench.run_vs_reference("hunyuanvideo-1.5-480p-i2v-step-distilled", (48, 32), 9, 1, "fp32", repeats=1,
                               warmup=0, width=HY15_WIDTHS["hunyuanvideo-1.5-480p-i2v"], json_path=tmp_path / "ref.json",
                               echo=lambda *_: None)
    assert not r["skipped"] and r["batch"] == 1 and r["config"]["use_meanflow"]
    assert r["output_relative_l2_error"] < 1e-5
    assert r["reference_flops_per_step_model"] == pytest.approx(r["flops_per_step_torch_counter"], rel=1e-3)


# ---- memory model and prediction ----


def test_estimate_peak_memory_stages():
    spec = get_spec("wan2.2-t2v-a14b")
    est = flops.estimate_peak_memory(spec, 832, 480, 81, vae_tile=(256, 256))  # as --vae-tiling auto decodes it
    assert set(est.stages) == {"text_encoding", "denoising", "decoding"}
    assert est.peak_stage == "denoising"
    assert est.peak_bytes > flops.weight_bytes(spec)["transformer_expert"]
    unfused = flops.estimate_peak_memory(spec, 832, 480, 81, fused_attention=False)
    assert unfused.peak_bytes > est.peak_bytes  # the N^2 score matrix
    assert flops.estimate_peak_memory(spec, 832, 480, 81, quantize="q4").stages["denoising"]["weights"] < 9e9


def test_predict():
    spec = get_spec("wan2.2-t2v-a14b")
    fast = cost.predict("m3-ultra", spec, 832, 480, 81)
    slow = cost.predict("m4-max", spec, 832, 480, 81)
    assert 0 < fast["minutes_per_video"] < slow["minutes_per_video"]
    assert fast["minutes_per_video_at_peak"] < fast["minutes_per_video"]
    assert fast["step_bound"] == "compute"
    measured = cost.predict("m3-ultra", spec, 832, 480, 81, measured_tflops=10.0)
    assert measured["peak_tflops"] == 10.0 and measured["efficiency"] == 1.0
    for chip in cost.CHIPS.values():
        assert chip.source and chip.fp32_tflops > 0 and chip.bandwidth_gbs > 0
    with pytest.raises(ValueError):
        cost.get_chip("m9-hyper")


# ---- the harnesses, tiny ----


def test_step_harness(tmp_path):
    out = tmp_path / "step.json"
    bench.run_step(size=(64, 64), frames=5, layers=2, dtype="fp32", repeats=2, width=TINY_WIDTH, peak_probe=128,
                   json_path=out, echo=lambda *_: None)
    r = _read(out)
    for field in ("seconds_per_step", "seconds_per_block", "full_depth_seconds_per_step", "flops_per_step",
                  "achieved_tflops", "mfu", "peak_memory_bytes", "weights_bytes", "activation_bytes_estimated",
                  "full_depth_peak_memory_bytes_extrapolated"):
        assert r[field] is not None, field
    assert r["tokens"] == 2 * 4 * 4 and r["batch"] == 2 and len(r["times_s"]) == 2
    assert r["peak_memory_bytes"] >= r["weights_bytes"] > 0
    # against torch's own count of diffusers' model at the same configuration and batch (latent 2x8x8: 32 tokens)
    pytest.importorskip("diffusers")
    case = bench.step_case(size=(64, 64), frames=5, layers=2, width=TINY_WIDTH)
    assert case.reference.inputs["hidden_states"].shape[:3] == (2, 16, 2)
    counted = bench.torch_flop_count(case.reference)["total"]
    assert r["flops_per_step"] == pytest.approx(counted, rel=1e-3)


def test_peak_harness(tmp_path):
    out = tmp_path / "peak.json"
    bench.run_peak("fp32", sizes=(64, 128), attn_tokens=(32, 64), heads=2, repeats=2, json_path=out,
                   echo=lambda *_: None)
    r = _read(out)
    assert {x["kind"] for x in r["results"]} == {"matmul", "attention"}
    assert r["matmul_peak_tflops"] > 0 and r["attention_peak_tflops"] > 0


def test_vs_reference_harness(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "ref.json"
    bench.run_vs_reference(size=(64, 64), frames=5, layers=2, dtype="fp32", repeats=1, width=TINY_WIDTH,
                           json_path=out, echo=lambda *_: None)
    r = _read(out)
    assert not r["skipped"]
    for field in ("time_ratio_ours_over_reference", "memory_ratio_ours_over_reference", "ours_peak_memory_bytes",
                  "reference_peak_memory_bytes", "torch_threads"):
        assert r[field], field
    # the same weights through DIFFUSERS_TRANSFORMER and the same inputs: the same velocity
    assert r["output_relative_l2_error"] < 1e-4
    assert r["flops_per_step_model"] == pytest.approx(r["flops_per_step_torch_counter"], rel=1e-3)


def test_vs_reference_skips_without_torch(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    messages = []
    r = bench.run_vs_reference(width=TINY_WIDTH, json_path=tmp_path / "skip.json", echo=messages.append)
    assert r["skipped"] and "diffusers" in r["reason"] and "skipped" in messages[0]


def test_vae_harness(tmp_path):
    out = tmp_path / "vae.json"
    bench.run_vae(sizes=((32, 32), (64, 32)), frame_counts=(1, 5, 9, 13), width={"config": TINY_VAE}, json_path=out,
                  echo=lambda *_: None)
    r = _read(out)
    assert len(r["results"]) == 8
    assert [x["frames"] for x in r["results"][:4]] == [1, 5, 9, 13]
    for x in r["results"]:
        assert x["seconds_per_frame"] > 0 and x["peak_memory_bytes"] > r["weights_bytes"]
    # decoding chunk by chunk: the peak does not grow with the frame count
    for growth in r["peak_growth"].values():
        assert growth < 1.25


def test_cli(tmp_path):
    runner = CliRunner()
    res = runner.invoke(bench.bench, ["estimate", "--chip", "m3-ultra", "--size", "832x480",
                                      "--json", str(tmp_path / "est.json")])
    assert res.exit_code == 0, res.output
    assert "m3-ultra" in res.output
    r = _read(tmp_path / "est.json")
    assert r["tokens"] == 32_760 and r["predictions"][0]["chip"] == "m3-ultra"
    res = runner.invoke(bench.bench, ["peak", "--sizes", "64", "--tokens", "32", "--heads", "2", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    # any registered family: HunyuanVideo 1.5 720p x 121 (31 x 45 x 80 tokens) through its own cost model
    res = runner.invoke(bench.bench, ["estimate", "--model", "hunyuanvideo-1.5-720p-t2v", "--chip", "m3-ultra",
                                      "--json", str(tmp_path / "hy15.json")])
    assert res.exit_code == 0, res.output
    r = _read(tmp_path / "hy15.json")
    assert r["tokens"] == 31 * 45 * 80 and r["frames"] == 121
    assert r["speedups"]["rows"][0]["plan"] == "dense"
    rows = {row["plan"]: row for row in r["speedups"]["rows"]}
    assert 0 < r["speedups"]["radial_fraction"] < 1 and r["speedups"]["radial"]["dense_steps"] == 12
    assert rows["taylorseer"]["evaluations"] == 50  # the release's schedule: 25 of 50 steps, two passes each
    assert rows["radial + taylorseer"]["total"] < rows["radial"]["total"] < rows["dense"]["total"]
    res = runner.invoke(bench.bench, ["estimate", "--chip", "m9"])
    assert res.exit_code != 0
    assert {"step", "peak", "vs-reference", "vae", "estimate"} <= set(bench.bench.commands)


@pytest.mark.parametrize("model, passes", [("wan2.2-t2v-a14b", 2), ("hunyuanvideo-t2v", 1), ("hunyuanvideo-i2v", 1),
                                           ("hunyuanvideo-1.5-480p-t2v-distilled", 1), ("mochi-1-preview", 2)])
def test_estimate_counts_the_passes_the_published_settings_run(tmp_path, model, passes):
    """HunyuanVideo's guidance is an input of its one pass (embedded), a distilled model's is 1: one evaluation a
    step unless --guidance asks for classifier-free guidance."""
    runner = CliRunner()
    for flag, expected in (([], passes), (["--guidance"], 2), (["--no-guidance"], 1)):
        out = tmp_path / f"{model}{flag}.json"
        res = runner.invoke(bench.bench, ["estimate", "--model", model, "--chip", "m3-ultra", *flag, "--json", str(out)])
        assert res.exit_code == 0, res.output
        r = _read(out)
        dense = r["speedups"]["rows"][0]
        assert r["guidance"] == (expected == 2) and dense["evaluations"] == expected * r["steps"], (flag, dense)


def test_mlxvid_bench_runs_the_repository_harness(tmp_path, capsys):
    from mlx_video.cli import main

    main(["bench", "estimate", "--chip", "m2-max", "--size", "832x480", "--json", str(tmp_path / "e.json")])
    assert "m2-max" in capsys.readouterr().out
    assert _read(tmp_path / "e.json")["tokens"] == 32_760


def test_every_registry_model_has_a_model():
    for spec in MODELS.values():
        w, h = spec.default_size
        assert cost.predict("m2-ultra", spec, w, h, spec.frames)["minutes_per_video"] > 0
