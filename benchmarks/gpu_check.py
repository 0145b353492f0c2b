"""The GPU check: one entry that, on a machine with a GPU, checks the custom kernels and times ours against
diffusers on the same GPU, and writes a JSON + Markdown report to the folder given on its command line.

Stages (benchmarks/gpu_stages.py), each in its own process with its own time budget, so that one that fails,
hangs or runs out of memory is reported and the next one runs:

  environment   the device, versions, whether MLX's attention is fused, the bf16 matmul rate of MLX and torch
  kernels       every kernel variant of mlx_video/kernels.py (kernels/cuda or kernels/metal) against the portable
                MLX path: which compiled and ran, `mx.fast.cuda_kernel` / `metal_kernel` errors by kernel name,
                max errors (fp8: bit-exactness)
  step-FAMILY   one denoising step of a family's model at real width and reduced depth, as its bench module's
                GPU_CHECK says (the first family in registry order first, today Wan 2.2 T2V-A14B, 2 blocks, bf16,
                CFG batch 2, 832x480x81, 32,760 tokens): ours with the kernels, ours with MLXVID_KERNELS=portable,
                and the diffusers reference on torch, the same random weights and inputs, rounds alternating:
                medians, TFLOP/s (the family cost model's FLOPs) against the GPU's published dense bf16 peak,
                peak memory
  vae           the first family's VAE case with a reference (today the Wan 2.1 VAE, A14B's, decoding 21 latent
                frames at 832x480), ours against diffusers' (AutoencoderKLWan)
  radial        radial attention (mlx_video.nn.radial, where it exists; the first family's radial case, today
                A14B's RADIAL_DEFAULTS) against dense at 75,600 tokens, and its GPU kernel path against
                MLXVID_KERNELS=portable where one exists
  step-FAMILY   the other families' steps (today HunyuanVideo's and Mochi's widths), if time is left

On an NVIDIA GPU lent through the device tool (no network there; at most 64 MiB travels per call):

  1. here, with network, in the checkout the device tool sends, once per mlx version:
         python benchmarks/gpu_check.py --prepare .gpucheck
     downloads the mlx and mlx-cuda-13 wheels of the mlx version installed here (what pyproject.toml resolves;
     mlx-cuda-13 must match it), diffusers (the version installed here) and importlib_metadata, and splits them
     into parts under 60 MiB (.gpucheck/part-0, part-1) with a manifest of sha256s. It prints the two calls:
  2. run(command="python3 benchmarks/gpu_check.py --stage-parts .gpucheck", carry=[".gpucheck/part-0"],
         timeout_s=120)
     copies part 0 into a scratch folder there (/tmp/mlxvid-gpucheck); the machine stays warm 30 s, so
  3. at once: run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --install .gpucheck --out $OUT",
         carry=[".gpucheck/part-1"], timeout_s=540)
     reassembles and verifies the wheels, installs them and this checkout into the scratch prefix (mlx finds the
     CUDA libraries of the image's torch through LD_LIBRARY_PATH), runs the stages and writes $OUT/report.json
     and $OUT/report.md. The stages get `--time-budget` seconds (default 420) after the install. A rerun on the
     still-warm machine (after a fix) skips the wheels: the same call with e.g. `--stages kernels,step-wan
     --time-budget 200`.

On a Mac (Apple silicon, the project and torch + diffusers installed: `pip install -e '.[test]' torch`):

  python benchmarks/gpu_check.py --backend metal --out gpu-check --time-budget 1800

On this CPU, in CI (tests/test_gpu_check.py): `--dry-run`, tiny sizes, MLX's CPU back-end and the portable path,
the torch reference on the CPU, no install; the report has the same structure and ours agrees with diffusers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRATCH = Path("/tmp/mlxvid-gpucheck")
PART_LIMIT = 56 * 2**20  # bytes of wheels per carried part: one call carries one part plus the working tree
CARRY_LIMIT = 63 * 2**20  # what one call may carry in all (the tool's limit is 64 MiB)
MANIFEST = "manifest.json"
DEFAULT_TIME_BUDGET = 420.0  # seconds for the stages on a CUDA GPU, after the install

# Time budgets in seconds on a CUDA GPU (scaled by --time-budget / DEFAULT_TIME_BUDGET): the fixed stages, then
# the step of the first family (in registry order) that declares a GPU check step case and of each other. The
# order of the stages is gpu_stages.stage_order(), read from the family packages (their bench modules'
# GPU_CHECK) where mlx_video imports: in this process for the dry run, in a child after the install otherwise. A
# stage starts only with at least MIN_STAGE_SECONDS left.
FIXED_BUDGETS = {"environment": 45, "kernels": 75, "vae": 100, "radial": 50}
FIRST_STEP_BUDGET, STEP_BUDGET = 150, 100
MIN_STAGE_SECONDS = 20.0
FAMILY_FOLDER = ROOT / "mlx_video" / "families"

REAL = {
    "cases": "real", "dtype": "bf16", "repeats": 5, "reserve_s": 5, "attention_budget_mb": 4096, "matmul_n": 8192,
    "sdpa_probe_tokens": 4096,
    "kernels": {"tokens": 7800, "dim": 5120, "heads": 40, "rope_grid": [5, 30, 52],
                "rope_splits": {"44/42/42": [44, 42, 42], "16/56/56": [16, 56, 56]}},
}
# Tiny sizes for the CPU dry run: the same code paths, odd token counts (each family's tiny cases: its GPU_CHECK).
DRY = {
    "cases": "dry", "dtype": "fp32", "repeats": 1, "reserve_s": 0, "attention_budget_mb": 64, "matmul_n": 64,
    "sdpa_probe_tokens": 256,
    "kernels": {"tokens": 30, "dim": 40, "heads": 2, "rope_grid": [2, 3, 5],
                "rope_splits": {"12/10/10": [12, 10, 10], "8/12/12": [8, 12, 12]}},
}


def step_stage_names() -> list[str]:
    """step-FAMILY for every family package with a bench module (read from the folder: mlx_video may not import
    here before the install); gpu_stages.stage_order() has those that declare a GPU check step, in order."""
    return [f"step-{p.parent.name}" for p in sorted(FAMILY_FOLDER.glob("*/bench.py"))]


def stage_budget(name: str, names: list[str]) -> float:
    if name in FIXED_BUDGETS:
        return FIXED_BUDGETS[name]
    first = next((n for n in names if n.startswith("step-")), None)
    return FIRST_STEP_BUDGET if name == first else STEP_BUDGET


# ---------------------------------------------------------------------------------------------- preparing


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_requirements() -> list[str]:
    """What the GPU machine lacks, pinned to what is installed here: mlx and mlx-cuda-13 at the mlx version that
    pyproject.toml resolved (mlx-cuda-13 must equal it), diffusers, and diffusers' importlib_metadata."""
    mlx = metadata.version("mlx")
    return [f"mlx=={mlx}", f"mlx-cuda-13=={mlx}", f"diffusers=={metadata.version('diffusers')}",
            f"importlib_metadata=={metadata.version('importlib_metadata')}"]


def working_tree_bytes() -> int:
    """Bytes of what the device tool sends with every call: tracked and untracked, not ignored, files."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listing if name and (ROOT / name).is_file())


def prepare(folder: Path, overwrite: bool) -> dict:
    """Download the wheels (pip, --no-deps, for CPython 3.12 on manylinux_2_35 x86-64) and split them into parts
    that each fit one call beside the working tree; write the manifest into every part."""
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise SystemExit(f"{folder} is not empty: pass --overwrite to prepare it again")
        shutil.rmtree(folder)
    download = folder / "download"
    download.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_35_x86_64",
                    "-d", str(download), *wheel_requirements()], check=True)
    part_bytes = min(PART_LIMIT, CARRY_LIMIT - working_tree_bytes())
    manifest = write_parts(sorted(download.glob("*.whl")), folder, part_bytes)
    manifest.update(requirements=wheel_requirements(), python="3.12", platform="manylinux_2_35_x86_64")
    for part in sorted(folder.glob("part-*")):
        (part / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(download)
    return manifest


def write_parts(wheels: list[Path], folder: Path, part_bytes: int) -> dict:
    """Split `wheels` into folder/part-*/ and write the manifest (sizes and sha256s of wheels and chunks) into
    every part, so that any one call finds it."""
    manifest = {"wheels": [{"name": w.name, "size": w.stat().st_size, "sha256": sha256(w)} for w in wheels],
                "chunks": split_into_parts(wheels, folder, part_bytes)}
    for part in sorted(folder.glob("part-*")):
        (part / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def split_into_parts(wheels: list[Path], folder: Path, part_bytes: int) -> list[dict]:
    """The wheels, concatenated in order, cut into chunks of `part_bytes`, chunk i in folder part-i."""
    chunks, index, buffer = [], 0, b""

    def flush(data: bytes):
        nonlocal index
        path = folder / f"part-{index}" / f"chunk-{index:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        chunks.append({"file": f"part-{index}/{path.name}", "size": len(data), "sha256": sha256(path)})
        index += 1

    for wheel in wheels:
        buffer += wheel.read_bytes()
        while len(buffer) >= part_bytes:
            flush(buffer[:part_bytes])
            buffer = buffer[part_bytes:]
    if buffer:
        flush(buffer)
    return chunks


def print_calls(folder: Path, manifest: dict) -> None:
    parts = sorted({c["file"].split("/")[0] for c in manifest["chunks"]})
    rel = os.path.relpath(folder, ROOT)
    print(f"prepared {len(manifest['wheels'])} wheels in {len(parts)} parts under {rel}:")
    for w in manifest["wheels"]:
        print(f"  {w['name']}  {w['size'] / 2**20:.1f} MiB")
    for part in parts[:-1]:
        print(f'run(command="python3 benchmarks/gpu_check.py --stage-parts {rel}", carry=["{rel}/{part}"], '
              'timeout_s=120)')
    print(f'then at once: run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --install {rel} '
          f'--out $OUT", carry=["{rel}/{parts[-1]}"], timeout_s=540)')


# ---------------------------------------------------------------------------------------------- on the GPU machine


def read_manifest(folder: Path) -> dict:
    for candidate in [*sorted(folder.glob(f"part-*/{MANIFEST}")), SCRATCH / MANIFEST]:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise SystemExit(f"no {MANIFEST} under {folder}/part-* or {SCRATCH}: run --prepare here first, and carry a part")


def stage_parts(folder: Path) -> list[str]:
    """Verify the chunks carried in this call and keep them in the scratch folder for the next call."""
    manifest = read_manifest(folder)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    (SCRATCH / MANIFEST).write_text(json.dumps(manifest))
    staged = []
    for chunk in manifest["chunks"]:
        path = folder / chunk["file"]
        if path.is_file():
            if sha256(path) != chunk["sha256"]:
                raise SystemExit(f"{chunk['file']}: sha256 differs from the manifest (damaged in transfer?)")
            shutil.copyfile(path, SCRATCH / Path(chunk["file"]).name)
            staged.append(chunk["file"])
    print(f"staged {', '.join(staged) or 'nothing'} in {SCRATCH}")
    return staged


def find_chunk(folder: Path, chunk: dict) -> Path:
    for path in (folder / chunk["file"], SCRATCH / Path(chunk["file"]).name):
        if path.is_file() and sha256(path) == chunk["sha256"]:
            return path
    raise SystemExit(f"chunk {chunk['file']} is neither carried in this call nor staged by an earlier one (within "
                     f"30 s) with its sha256: run --stage-parts with carry {chunk['file'].split('/')[0]} first")


def reassemble(folder: Path) -> list[Path]:
    """The wheels rebuilt from the chunks, each checked against its sha256, in SCRATCH/wheels."""
    manifest = read_manifest(folder)
    stream = b"".join(find_chunk(folder, c).read_bytes() for c in manifest["chunks"])
    out = SCRATCH / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    paths, offset = [], 0
    for wheel in manifest["wheels"]:
        path = out / wheel["name"]
        path.write_bytes(stream[offset:offset + wheel["size"]])
        offset += wheel["size"]
        if sha256(path) != wheel["sha256"]:
            raise SystemExit(f"{wheel['name']}: reassembled, its sha256 differs from the manifest")
        paths.append(path)
    return paths


def install(folder: Path) -> dict:
    """Reassemble the wheels and install them, then this checkout, into SCRATCH/site (no network, no deps: the
    image has torch, numpy and the rest)."""
    start = time.perf_counter()
    site, marker = SCRATCH / "site", SCRATCH / "installed.json"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site)]
    wheels = read_manifest(folder)["wheels"]
    if not marker.is_file() or json.loads(marker.read_text()) != wheels:  # a rerun on a warm machine skips this
        subprocess.run([*pip, *map(str, reassemble(folder))], check=True)
        marker.write_text(json.dumps(wheels))
    project = subprocess.run([*pip, "--no-build-isolation", str(ROOT)], capture_output=True, text=True)
    how = "pip install of this checkout"
    if project.returncode:  # e.g. no setuptools there: lay the packages out as pyproject.toml maps them
        copy_as_packaged(site)
        how = f"copied as pyproject.toml maps it (pip failed: {project.stderr.strip()[-300:]})"
    return {"wheels": [w["name"] for w in wheels], "prefix": str(site), "project": how,
            "seconds": time.perf_counter() - start}


def copy_as_packaged(site: Path) -> None:
    """This checkout's packages copied into `site` the way pyproject.toml's package-dir maps them (Python 3.11+)."""
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, source in sorted(mapping.items()):  # parents first: mlx_video, then mlx_video.convert, ...
        shutil.copytree(ROOT / source, site / package.replace(".", "/"), dirs_exist_ok=True)


def nvidia_library_dirs() -> list[str]:
    """The CUDA libraries of the pip packages already installed (torch's nvidia-* wheels), which libmlx.so's
    RPATH looks for beside itself ($ORIGIN/../../nvidia/.../lib)."""
    import site

    roots = [*site.getsitepackages(), *sys.path]
    dirs = {str(p) for root in roots if root and Path(root, "nvidia").is_dir()
            for p in Path(root, "nvidia").glob("*/lib") if p.is_dir()}
    driver = [d for d in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib") if Path(d).is_dir()]
    return sorted(dirs) + driver


def import_check(env: dict) -> str:
    """What MLX reports in the stages' environment (device, CUDA), or why it does not import: a broken install
    shows here once, before every stage fails the same way."""
    code = "import mlx.core as mx; print(mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    text = (proc.stdout if proc.returncode == 0 else proc.stderr).strip()
    print(f"[gpu-check] mlx in the stages' environment: {text[-600:]}", flush=True)
    return text[-600:]


def worker_env(prefix: str | None) -> dict:
    env = dict(os.environ)
    env.pop("MLXVID_KERNELS", None)
    env["PYTHONUNBUFFERED"] = "1"
    if prefix:
        env["PYTHONPATH"] = os.pathsep.join([prefix, *filter(None, [env.get("PYTHONPATH")])])
        libs = nvidia_library_dirs()
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return env


# ---------------------------------------------------------------------------------------------- the stages


def stage_settings(settings: dict, seconds: float) -> dict:
    return {**settings, "deadline": time.time() + seconds}


def run_isolated(name: str, settings: dict, seconds: float, env: dict, scratch: Path) -> dict:
    """Stage `name` in a child process killed after `seconds`; what it recorded until then is kept."""
    settings_path, result_path = scratch / f"{name}.settings.json", scratch / f"{name}.json"
    settings_path.write_text(json.dumps(stage_settings(settings, seconds - 2)))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--settings", str(settings_path),
               "--result", str(result_path)]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds)
        status, tail = ("ok" if proc.returncode == 0 else "failed"), (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:  # its output is bytes here whatever text= says
        output = [o.decode(errors="replace") if isinstance(o, bytes) else o for o in (e.stdout, e.stderr) if o]
        status, tail = "timed out", "".join(output)[-4000:]
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    return {"status": status, "result": result, "output_tail": tail if status != "ok" else ""}


def run_in_process(name: str, settings: dict, seconds: float) -> dict:
    """Stage `name` in this process (the dry run): an exception is reported, not raised."""
    from gpu_stages import Record, run_stage

    record = Record()
    try:
        run_stage(name, stage_settings(settings, seconds), record)
        return {"status": "ok", "result": dict(record), "output_tail": ""}
    except Exception:  # a stage's failure is a finding of the check, reported with the next stages still run
        return {"status": "failed", "result": dict(record), "output_tail": traceback.format_exc()[-4000:]}


def run_stages(settings: dict, names: list[str], time_budget: float, isolate: bool, env: dict,
               scratch: Path) -> list[dict]:
    """Every stage in order, each within its budget (scaled to `time_budget`) and what is left of the run's."""
    scale, deadline, rows = time_budget / DEFAULT_TIME_BUDGET, time.time() + time_budget, []
    for name in names:
        left = deadline - time.time()
        if left < MIN_STAGE_SECONDS:
            rows.append({"stage": name, "status": "skipped", "reason": f"no time left ({left:.0f} s)"})
            continue
        seconds = min(stage_budget(name, names) * scale, left)
        start = time.perf_counter()
        print(f"[gpu-check] stage {name} (budget {seconds:.0f} s)", flush=True)
        row = run_isolated(name, settings, seconds, env, scratch) if isolate else run_in_process(name, settings,
                                                                                               seconds)
        rows.append({"stage": name, "seconds": time.perf_counter() - start, "budget_s": seconds, **row})
        print(f"[gpu-check] stage {name}: {row['status']} in {rows[-1]['seconds']:.1f} s", flush=True)
    return rows


def worker(name: str, settings_path: str, result_path: str) -> int:
    from gpu_stages import Record, run_stage

    record = Record(result_path)
    try:
        run_stage(name, json.loads(Path(settings_path).read_text()), record)
    except Exception:  # reported through the result file; the driver goes on with the next stage
        record.update(error=traceback.format_exc()[-4000:])
        traceback.print_exc()
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- the report


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown_kernels(r: dict) -> list[str]:
    used = sum(v["used"] for v in r.get("variants", []))
    lines = [f"Path: **{r.get('backend')}**; variants compiled and used: {used} of {len(r.get('variants', []))}; "
             f"never probed: {', '.join(r.get('kernels_not_probed', [])) or 'none'}.", ""]
    for name, messages in r.get("compile_errors", {}).items():  # a compile error or a wrong result in the probe
        lines.append(f"- **{name}** disabled: {messages[0][:400]}")
    lines += ["", "| op | variant | max abs error | relative L2 | bit-exact |", "|---|---|---|---|---|"]
    lines += [f"| {c['op']} | {c['variant']} | {fmt(c['max_abs_error'])} | {fmt(c['relative_l2_error'])} | "
              f"{fmt(c.get('bit_exact', '-'))} |" for c in r.get("cases", [])]
    return lines


def markdown_step(r: dict) -> list[str]:
    lines = [f"{r.get('tokens')} tokens, {fmt(r.get('flops_per_step'), '.4g')} FLOP per step (cost model), "
             f"{r.get('dtype')}, batch {r.get('batch')}, {r.get('rounds', '-')} alternating rounds; "
             f"bf16 peak {fmt(r.get('bf16_peak_tflops'))} TFLOP/s ({r.get('bf16_peak_source')}); "
             f"MLX attention fused: {r.get('mlx_sdpa', {}).get('fused')}.", "",
             "| side | median s | min s | TFLOP/s | of bf16 peak | peak memory |", "|---|---|---|---|---|---|"]
    for name, s in r.get("sides", {}).items():
        share = s.get("fraction_of_bf16_peak")
        lines.append(f"| {name} | {fmt(s['seconds_median'], '.4f')} | {fmt(s['seconds_min'], '.4f')} | "
                     f"{fmt(s['tflops'], '.4g')} | {'-' if share is None else f'{share:.1%}'} | "
                     f"{gib(s['peak_memory_bytes'])} |")
    agreement = ", ".join(f"{k} {v:.2e}" for k, v in r.get("agreement", {}).items())
    return lines + ["", f"Relative L2 differences: {agreement or '-'}."]


def markdown_timed(r: dict, ratio_key: str) -> list[str]:
    if r.get("skipped"):
        return [f"Skipped: {r.get('reason')}."]
    facts = {k: v for k, v in r.items() if k not in ("sides", "error") and not isinstance(v, (dict, list))}
    lines = ["; ".join(f"{k} {fmt(v)}" for k, v in facts.items()), "", "| side | median s | peak memory |",
             "|---|---|---|"]
    lines += [f"| {n} | {fmt(s['seconds_median'], '.4f')} | {gib(s.get('peak_memory_bytes'))} |"
              for n, s in r.get("sides", {}).items()]
    return lines + ["", f"{ratio_key}: {fmt(r.get(ratio_key))}."]


def markdown(report: dict) -> str:
    env = next((s["result"] for s in report["stages"] if s["stage"] == "environment"), {})
    lines = [f"# GPU check: {env.get('device', report['backend'])}", "",
             f"{report['date']}, `{report['command']}`, mode {report['mode']}; mlx {env.get('mlx')}, "
             f"torch {env.get('torch')}, diffusers {env.get('diffusers')}; install: {report.get('install') or '-'}.",
             "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {fmt(s.get('seconds'), '.1f')} |" for s in report["stages"]]
    for s in report["stages"]:
        r, name = s.get("result") or {}, s["stage"]
        lines += ["", f"## {name}", ""]
        if name == "kernels" and r.get("cases"):
            lines += markdown_kernels(r)
        elif name.startswith("step-") and r.get("sides"):
            lines += markdown_step(r)
        elif name in ("vae", "radial") and r:
            lines += markdown_timed(r, "time_ratio_ours_over_reference" if name == "vae" else
                                    "time_ratio_radial_over_dense")
        elif r:
            lines.append("; ".join(f"{k}: {fmt(v) if not isinstance(v, dict) else json.dumps(v)}"
                                   for k, v in r.items() if k != "error"))
        if s.get("reason"):
            lines.append(f"Skipped: {s['reason']}.")
        if s.get("output_tail") or r.get("error"):
            lines += ["", "```", (r.get("error") or s["output_tail"])[-1500:], "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    write_atomic(out / "report.md", markdown(report))


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", type=Path, help="download and split the wheels into DIR (here)")
    p.add_argument("--stage-parts", metavar="DIR", type=Path, help="keep the parts carried in this call (device)")
    p.add_argument("--install", metavar="DIR", type=Path, help="install the wheels of DIR, then run (device)")
    p.add_argument("--out", type=Path, help="folder of report.json and report.md")
    p.add_argument("--backend", choices=("cuda", "metal"), default="cuda")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, MLX's CPU, torch on the CPU, no install")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"seconds for all stages (default {DEFAULT_TIME_BUDGET:.0f}; stage budgets scale with it)")
    p.add_argument("--stages", default="all", help="comma-separated subset, in this order (default: all, "
                                                  "in gpu_stages.stage_order())")
    p.add_argument("--list-stages", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing report or prepared folder")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_run_args(args) -> list[str]:
    """Refuse a bad command line before any long work: the output folder and the stage names."""
    if args.out is None:
        raise SystemExit("--out DIR is required: the folder where report.json and report.md are written")
    existing = [p for p in (args.out / "report.json", args.out / "report.md") if p.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{existing[0]} exists: pass --overwrite to replace it, or choose another --out")
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    known = [*FIXED_BUDGETS, *step_stage_names()]
    unknown = [n for n in names if n not in known and n != "all"]
    if unknown or not names:
        raise SystemExit(f"unknown stage(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}, all")
    if args.install and (args.dry_run or args.backend != "cuda"):
        raise SystemExit("--install is for the CUDA machine only (not with --dry-run or --backend metal)")
    return names


def run_settings(args) -> tuple[dict, str]:
    if args.dry_run:
        return {**DRY, "backend": "cpu", "torch_device": "cpu"}, "dry run (CPU, tiny sizes)"
    if args.backend == "metal":
        import torch

        device = "mps" if torch.backends.mps.is_available() else "cpu"
        return {**REAL, "backend": "metal", "torch_device": device}, f"Metal, torch on {device}"
    return {**REAL, "backend": "cuda", "torch_device": "cuda"}, "CUDA"


def listed_stages(env: dict, isolate: bool) -> list[str]:
    """gpu_stages.stage_order(): in this process (the dry run), or in a child with the stages' environment."""
    if not isolate:
        from gpu_stages import stage_order

        return stage_order()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--list-stages"], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise SystemExit(f"listing the stages failed: {(proc.stdout + proc.stderr)[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    names = check_run_args(args)
    settings, mode = run_settings(args)
    budget = args.time_budget or (DEFAULT_TIME_BUDGET * (4 if args.backend == "metal" else 1))
    installed = install(args.install) if args.install else None
    scratch = SCRATCH / "stages"  # the stages' settings and results, when each runs in its own process
    if not args.dry_run:
        scratch.mkdir(parents=True, exist_ok=True)
    env = worker_env(installed["prefix"] if installed else None)
    if installed:
        installed["import_check"] = import_check(env)
    if names == ["all"]:
        names = listed_stages(env, not args.dry_run)
    start = time.time()
    stages = run_stages(settings, names, budget, not args.dry_run, env, scratch)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "mode": mode, "backend": settings["backend"], "torch_device": settings["torch_device"],
              "install": installed, "time_budget_s": budget, "seconds": time.time() - start, "settings": settings,
              "stages": stages}
    write_report(args.out, report)
    print(markdown(report))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.settings, args.result)
    if args.list_stages:
        from gpu_stages import stage_order

        print(json.dumps(stage_order()))
        return 0
    if args.prepare:
        print_calls(args.prepare, prepare(args.prepare, args.overwrite))
        return 0
    if args.stage_parts:
        stage_parts(args.stage_parts)
        return 0
    report = run(args)
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
