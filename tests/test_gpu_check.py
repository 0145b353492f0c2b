"""benchmarks/gpu_check.py, the GPU check, kept from rotting on a machine without a GPU: its dry run (tiny sizes,
MLX's CPU back-end, the portable kernels, diffusers on CPU torch) writes the report every stage fills on a GPU,
and ours agrees with the reference there; the wheel parts it carries to the GPU machine reassemble bit for bit;
a failing or hanging stage is reported and the next one runs."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_stages  # noqa: E402

KERNEL_OPS = {"dequantize_fp8", "apply_rope", "apply_rope_qk", "adaln_modulate", "gated_residual"}
STEP_SIDES = {"ours_kernels", "ours_portable", "reference"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    rc = gpu_check.main(["--dry-run", "--out", str(out)])
    return rc, out, json.loads((out / "report.json").read_text())


def stage(report: dict, name: str) -> dict:
    return next(s for s in report["stages"] if s["stage"] == name)


def test_dry_run_report_structure(dry_run):
    rc, out, report = dry_run
    assert rc == 0, [(s["stage"], s.get("output_tail")) for s in report["stages"]]
    assert [s["stage"] for s in report["stages"]] == gpu_stages.stage_order()
    assert {s["status"] for s in report["stages"]} == {"ok"}
    assert report["backend"] == "cpu" and report["install"] is None
    env = stage(report, "environment")["result"]
    assert env["kernel_backend"] == "portable" and env["mlx_matmul_tflops"] > 0 and env["torch_matmul_tflops"] > 0
    assert env["mlx_sdpa"]["fused"] is False  # MLX's CPU attention materialises the scores
    kernels = stage(report, "kernels")["result"]
    assert {c["op"] for c in kernels["cases"]} == KERNEL_OPS and kernels["backend"] == "portable"
    assert kernels["compile_errors"] == {} and kernels["worst_relative_l2_error"] == 0.0
    markdown = (out / "report.md").read_text()
    for name in gpu_stages.stage_order():
        assert f"## {name}" in markdown
    assert "| ours_kernels |" in markdown and "| op | variant |" in markdown


def _step_families():
    return gpu_stages.families_with("step", "dry")


def test_every_step_stage_has_a_dry_case():
    assert gpu_stages.families_with("step", "real") == _step_families() and _step_families()


@pytest.mark.parametrize("family", _step_families())
def test_dry_run_step_agrees_with_diffusers(dry_run, family):
    result = stage(dry_run[2], f"step-{family}")["result"]
    assert set(result["sides"]) == STEP_SIDES and result["rounds"] >= 1
    for side in result["sides"].values():
        assert side["seconds_median"] > 0 and side["tflops"] > 0 and len(side["times_s"]) == result["rounds"]
    assert result["tokens"] > 0 and result["flops_per_step"] > 0
    # the same weights through our key tables and the same inputs (fp32): the same velocity
    agreement = result["agreement"]
    assert agreement["ours_kernels_vs_reference"] < 1e-4 and agreement["ours_portable_vs_reference"] < 1e-4
    assert agreement["ours_kernels_vs_ours_portable"] == 0.0  # one path on the CPU


def test_dry_run_vae_agrees_with_diffusers(dry_run):
    result = stage(dry_run[2], "vae")["result"]
    assert result["agreement_max_abs_over_max"] < 1e-4
    assert result["frames"] == 5 and set(result["sides"]) == {"ours", "reference"}


def test_dry_run_radial_is_run_or_skipped_with_a_reason(dry_run):
    result = stage(dry_run[2], "radial")["result"]
    if result["skipped"]:
        assert "mlx_video.nn.radial" in result["reason"]
    else:
        assert result["finite"] and 0 < result["score_fraction"] <= 1


def test_refuses_before_work(dry_run, tmp_path):
    out = dry_run[1]
    with pytest.raises(SystemExit, match="--overwrite"):
        gpu_check.main(["--dry-run", "--out", str(out)])
    with pytest.raises(SystemExit, match="unknown stage"):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--stages", "kernels,warp-drive"])
    with pytest.raises(SystemExit, match="--out"):
        gpu_check.main(["--dry-run"])
    with pytest.raises(SystemExit, match="CUDA machine only"):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--install", str(tmp_path)])


def test_parts_reassemble_bit_for_bit(tmp_path, monkeypatch):
    """Wheels cut into parts, one part staged by a first call and gone from the second: the second call rebuilds
    every wheel exactly; a damaged chunk is named."""
    monkeypatch.setattr(gpu_check, "SCRATCH", tmp_path / "scratch")
    rng = random.Random(0)
    wheels = []
    for name, size in (("a-1-py3-none-any.whl", 2500), ("b-2-py3-none-any.whl", 7), ("c-3-cp312.whl", 4100)):
        path = tmp_path / "download" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(rng.randbytes(size))
        wheels.append(path)
    folder = tmp_path / ".gpucheck"
    manifest = gpu_check.write_parts(wheels, folder, part_bytes=3000)
    assert [c["file"] for c in manifest["chunks"]] == ["part-0/chunk-00.bin", "part-1/chunk-01.bin",
                                                        "part-2/chunk-02.bin"]
    last = folder / "part-2" / "chunk-02.bin"
    held_back = last.read_bytes()
    last.unlink()
    gpu_check.stage_parts(folder)  # the first call carries every part but the last
    for part in ("part-0", "part-1"):
        for f in (folder / part).iterdir():
            f.unlink()
    last.write_bytes(held_back)  # the second call carries the last
    rebuilt = gpu_check.reassemble(folder)
    assert [p.read_bytes() for p in rebuilt] == [w.read_bytes() for w in wheels]
    (folder / "part-2" / "chunk-02.bin").write_bytes(b"damaged")
    with pytest.raises(SystemExit, match="chunk-02"):
        gpu_check.reassemble(folder)


def test_failing_stage_is_reported_and_the_next_runs(tmp_path, monkeypatch):
    def broken(settings, record):
        record.update(halfway=1)
        raise RuntimeError("cuda_kernel compile error")

    monkeypatch.setitem(gpu_stages.STAGES, "kernels", broken)
    settings = {**gpu_check.DRY, "backend": "cpu", "torch_device": "cpu"}
    rows = gpu_check.run_stages(settings, ["kernels", "radial"], 60.0, False, {}, tmp_path)
    assert rows[0]["status"] == "failed" and rows[0]["result"] == {"halfway": 1}
    assert "compile error" in rows[0]["output_tail"] and rows[1]["status"] == "ok"
    rows = gpu_check.run_stages(settings, ["radial"], gpu_check.MIN_STAGE_SECONDS / 2, False, {}, tmp_path)
    assert rows[0]["status"] == "skipped" and "no time left" in rows[0]["reason"]


def test_isolated_stage_failure_and_timeout(tmp_path):
    """In its own process (the GPU run): an error is written to the stage's result, a hang is killed."""
    env = gpu_check.worker_env(None)
    broken = {"backend": "cpu"}  # no torch_device: the environment stage fails at once
    row = gpu_check.run_isolated("environment", broken, 60.0, env, tmp_path)
    assert row["status"] == "failed" and "torch_device" in row["result"]["error"]
    hang = tmp_path / "hang"  # a child that hangs at start-up (sitecustomize runs first), whatever the machine's speed
    hang.mkdir()
    (hang / "sitecustomize.py").write_text("import time\ntime.sleep(60)\n")
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hang), env.get("PYTHONPATH")]))}
    row = gpu_check.run_isolated("environment", broken, 1.0, env, tmp_path)
    assert row["status"] == "timed out" and row["result"] == {}


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA H100 NVL", 835.0),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("Apple M3 Max", 14.2),
                                          ("Some CPU", None)])
def test_published_bf16_peaks(name, tflops):
    assert gpu_stages.bf16_peak_tflops(name)[0] == tflops


def test_a_step_stage_of_a_family_without_a_gpu_case_is_skipped_with_its_reason(tmp_path):
    """step-FAMILY is accepted for every family package with a bench module (read from the folder before the
    install); one whose module declares no GPU check step is reported as skipped, by name."""
    names = [n for n in gpu_check.step_stage_names() if n.removeprefix("step-") not in _step_families()]
    assert set(gpu_check.step_stage_names()) >= {f"step-{f}" for f in _step_families()}
    if not names:
        pytest.skip("every family with a bench module declares a GPU check step")
    settings = {**gpu_check.DRY, "backend": "cpu", "torch_device": "cpu"}
    row = gpu_check.run_stages(settings, names[:1], 60.0, False, {}, tmp_path)[0]
    assert row["status"] == "ok" and row["result"]["skipped"] and "GPU_CHECK" in row["result"]["reason"]
