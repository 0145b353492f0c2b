"""Several processes as one generation (mlx.launch, ring back-end, on this machine): CFG-parallel and
sequence-parallel runs give the single-process latents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_video.distributed import plan_split

WORKER = Path(__file__).parent / "support" / "scripts" / "distributed_worker.py"


def test_split_rule():
    assert plan_split(1, True) == (1, 1)
    assert plan_split(2, True) == (2, 1)
    assert plan_split(4, True) == (2, 2)
    assert plan_split(3, True) == (1, 3)
    assert plan_split(2, False) == (1, 2)


def _launch(n: int, *args) -> subprocess.CompletedProcess:
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch (installed with mlx) is not on PATH")
    return subprocess.run([launcher, "-n", str(n), "--backend", "ring", "--", sys.executable, str(WORKER), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("ranks, guidance, guidance_2, split", [
    (2, 4.0, 3.0, {"cfg_parallel": 2, "sequence_parallel": 1}),
    (2, 1.0, 1.0, {"cfg_parallel": 1, "sequence_parallel": 2}),
    (4, 4.0, 3.0, {"cfg_parallel": 2, "sequence_parallel": 2}),
])
def test_parallel_latents_match_one_process(a14b, tmp_path, ranks, guidance, guidance_2, split):
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, _ = a14b
    init = np.random.default_rng(ranks).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    single = pipe.generate(GenerationSettings(
        "a corgi surfs a wave at sunset", negative_prompt="static, blurry", width=48, height=32, frames=9, steps=3,
        guidance=guidance, guidance_2=guidance_2, shift=12.0), init_latents=init).latents
    out = tmp_path / "parallel.npy"
    proc = _launch(ranks, str(root / "mlx"), str(tmp_path / "init.npy"), str(out), str(guidance), str(guidance_2), "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    parallel = np.load(out)
    err = float(np.linalg.norm(parallel - single) / np.linalg.norm(single))
    print(f"{ranks} ranks {split}: relative error {err:.2e}")
    assert err < 1e-5
    record = json.loads(Path(str(out) + ".json").read_text())
    assert record["ranks"] == ranks and {k: record[k] for k in split} == split


def _launch_cli(n: int, *args, env=None) -> subprocess.CompletedProcess:
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch (installed with mlx) is not on PATH")
    return subprocess.run([launcher, "-n", str(n), "--backend", "ring", "--", sys.executable, "-m", "mlx_video.cli",
                           *args], capture_output=True, text=True, timeout=600, env=env)


def test_mlxvid_generate_on_two_ranks_writes_once(a14b, tmp_path):
    root, _ = a14b
    init = np.random.default_rng(5).standard_normal((1, 4, 3, 4, 6)).astype(np.float32)
    np.save(tmp_path / "init.npy", init)
    args = ["generate", "--model", str(root / "mlx"), "--prompt", "a corgi", "--size", "48x32", "--frames", "9",
            "--steps", "2", "--init-latents", str(tmp_path / "init.npy"), "--quiet"]
    proc = _launch_cli(2, *args, "--save-latents", str(tmp_path / "two.npy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecar = json.loads((tmp_path / "two.json").read_text())["settings"]
    assert sidecar["parallel"]["ranks"] == 2 and sidecar["parallel"]["cfg_parallel"] == 2
    assert len(sidecar["parallel"]["denoising_seconds_per_rank"]) == 2
    from mlx_video.cli import main

    main(args + ["--save-latents", str(tmp_path / "one.npy")])
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert float(np.linalg.norm(one - two) / np.linalg.norm(one)) < 1e-5


def test_a_rank_that_dies_stops_the_others_and_nothing_is_written(a14b, tmp_path):
    root, _ = a14b
    proc = _launch(2, "--die-on-rank-1", "generate", "--model", str(root / "mlx"), "--prompt", "a corgi", "--size",
                   "48x32", "--frames", "9", "--steps", "2", "--quiet", "--save-latents", str(tmp_path / "x.npy"))
    # rank 0 stops either on its own (the ring reports the lost peer; mlxvid says so) or because mlx.launch
    # ends the group when a rank fails; either way with a message, and with nothing written
    assert ("another rank of the group stopped" in proc.stderr or "rank 0 exited" in proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.json").exists()


def test_two_rank_batch_runs_every_job_exactly_once(a14b, tmp_path):
    root, _ = a14b
    jobs = [{"prompt": f"job {k}", "model": str(root / "mlx"), "size": "48x32", "frames": 5, "steps": 1, "seed": k,
             "save_latents": f"job{k}.npy"} for k in range(3)]  # relative: outputs stay in the manifest's folder
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    proc = _launch_cli(2, "batch", str(manifest))
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [line for line in proc.stdout.splitlines() if line.startswith("job ")]
    assert sorted(started) == sorted(set(started)) and len(started) == 3, proc.stdout
    for k in range(3):
        assert (tmp_path / f"job{k}.npy").is_file() and (tmp_path / f"job{k}.json").is_file()
    summary = json.loads((tmp_path / "jobs.summary.json").read_text())
    rows = summary["jobs"] if isinstance(summary, dict) else summary
    assert [r["status"] for r in rows] == ["done"] * 3


def test_ranks_with_different_model_folders_are_refused(a14b, tmp_path):
    root, _ = a14b
    other = tmp_path / "other"
    shutil.copytree(root / "mlx", other)
    (other / "transformer" / "extra.txt").write_text("not the same folder")
    proc = _launch(2, "--folder-per-rank", f"{root / 'mlx'},{other}", "--prompt", "a corgi", "--size", "48x32",
                   "--frames", "9", "--steps", "1", "--quiet", "--save-latents", str(tmp_path / "x.npy"))
    assert "the ranks hold different model folders" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "x.npy").exists()


def test_a_group_the_token_split_cannot_use_is_refused(a14b, tmp_path):
    """4 ranks without guidance: 4-way sequence-parallel over 18 tokens (48x32x9) does not divide."""
    root, _ = a14b
    proc = _launch(4, "--folder-per-rank", ",".join([str(root / "mlx")] * 4), "--prompt", "a corgi", "--size", "48x32",
                   "--frames", "9", "--steps", "1", "--guidance", "1", "--guidance-2", "1", "--quiet",
                   "--save-latents", str(tmp_path / "x.npy"))
    assert "cannot be split evenly over 4 sequence-parallel ranks" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "x.npy").exists()
