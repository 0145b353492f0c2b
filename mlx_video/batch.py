"""`mlxvid batch MANIFEST`: many generations from one file, unattended, resumable.

A manifest is a JSON list of objects, or JSON Lines (one object a line). Each object is one job whose keys are
`mlxvid generate`'s long option names with `_` for `-` (prompt, model, image, preset or size, quality,
duration or frames, steps, seed, output, overlay, watermark, ...). Relative paths are taken from the
manifest's folder; a job without `output` writes `<manifest>-<NNN>-<prompt words>.mp4` there.

1. Every entry is checked before any model is loaded; all bad entries are reported at once, with their lines.
2. The valid jobs run grouped by model (each model's pipeline is set up once, in the manifest's order of
   first appearance); a job that fails is reported and the others go on.
3. Outputs and sidecars are written atomically. On a re-run, a job whose output exists with a sidecar
   recording the same options is skipped, so an interrupted batch resumes where it stopped.
4. A summary table is printed and written as JSON beside the manifest (`<manifest>.summary.json`).
"""

from __future__ import annotations

import contextlib

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from .errors import MlxVideoError
from .options import GENERATE_OPTIONS, MAX_MANIFEST_LINE_BYTES, OPTIONS, recorded_options, validate

PATH_KEYS = tuple(o.name for o in GENERATE_OPTIONS if o.kind == "path")  # relative to the manifest's folder


@dataclass
class BatchJob:
    index: int  # 1-based position in the manifest
    line: int
    options: dict
    status: str = "pending"  # pending | invalid | skipped | done | failed | interrupted
    error: str | None = None
    timings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"job": self.index, "line": self.line, "model": self.options.get("model"),
                "prompt": self.options.get("prompt"), "status": self.status, "error": self.error,
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "output": self.options.get("output") or self.options.get("save_latents")}


def read_manifest(path: Path) -> list[tuple[int, object]]:
    """(line, entry) pairs of a JSON list or a JSON Lines file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MlxVideoError(f"cannot read the manifest {path}: {e}") from None
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    entries = []
    if stripped.startswith("["):
        i = text.index("[") + 1
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text):
                raise MlxVideoError(f"{path}: the list is not closed with ]")
            if text[i] == "]":
                break
            line, start = text.count("\n", 0, i) + 1, i
            try:
                entry, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise MlxVideoError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
            _check_entry_size(path, line, len(text[start:i].encode("utf-8")))
            entries.append((line, entry))
        return entries
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        _check_entry_size(path, number, len(line.encode("utf-8")))
        try:
            entries.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise MlxVideoError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
    return entries


def _check_entry_size(path: Path, line: int, size: int) -> None:
    if size > MAX_MANIFEST_LINE_BYTES:
        raise MlxVideoError(f"{path}, line {line}: a job of {size} bytes, more than the {MAX_MANIFEST_LINE_BYTES} "
                            "bytes a manifest entry may hold (prompts are at most "
                            f"{OPTIONS['prompt'].max_length} characters)")


def _job_options(entry: dict, base: Path) -> dict:
    """The entry checked by the option schema (`mlx_video.options.validate`, every problem named at once), with
    relative paths taken from the manifest's folder `base`."""
    options = validate(entry, all_problems=True)
    for key in PATH_KEYS:
        if options.get(key) is not None and not Path(options[key]).is_absolute():
            options[key] = base / options[key]
    mark = options.get("watermark")
    if mark and not Path(mark).is_absolute() and (base / mark).is_file():
        options["watermark"] = str(base / mark)
    model = options.get("model")
    if model is not None and not Path(str(model)).is_absolute() and (base / str(model)).exists():
        options["model"] = str(base / str(model))
    return options


def _default_output(manifest: Path, index: int, prompt: str) -> str:
    import re

    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].strip("-") or "video"
    return str(manifest.parent / f"{manifest.stem}-{index:03d}-{slug}.mp4")


def is_done(options: dict) -> bool | None:
    """True: the output and a sidecar recording these options exist; None: the output exists without a
    matching sidecar (made otherwise); False: not there."""
    from .io.sidecar import sidecar_path
    from .run import read_sidecar

    target = options.get("output") or options.get("save_latents")
    if target is None or not Path(target).exists():
        return False
    car = sidecar_path(target)
    if not car.is_file():
        return None
    try:
        recorded = read_sidecar(car).get("options")
    except MlxVideoError:
        return None
    return True if recorded == recorded_options(options) else None


def plan_batch(manifest: Path, pipelines: dict) -> list[BatchJob]:
    """Read and check every entry (no weights are read); returns the jobs with their status."""
    from .run import prepare

    manifest = Path(manifest)
    jobs, targets = [], {}
    for index, (line, entry) in enumerate(read_manifest(manifest), 1):
        job = BatchJob(index, line, entry if isinstance(entry, dict) else {})
        jobs.append(job)
        try:
            if not isinstance(entry, dict):
                raise MlxVideoError(f"a job is a JSON object, not {type(entry).__name__}")
            options = _job_options(entry, manifest.parent)
            if options.get("from_sidecar"):
                from .run import replay_options

                options = replay_options(options["from_sidecar"], options, explicit=set(entry) - {"from_sidecar"})
            if not options.get("output") and not options.get("save_latents"):
                options["output"] = _default_output(manifest, index, options["prompt"])
            options.setdefault("quiet", True)
            job.options = options
            target = str(Path(options.get("output") or options.get("save_latents")).resolve())
            if target in targets:
                raise MlxVideoError(f"writes {target}, as job {targets[target]} does; give each job its own output")
            targets[target] = index
            done = is_done(options)
            if done:
                job.status = "skipped"
                continue
            if done is None and not options.get("overwrite"):
                # the output is there but no matching sidecar: an interrupted write, or another run's file
                target = options.get("output") or options.get("save_latents")
                from .io.sidecar import sidecar_path

                if sidecar_path(target).is_file():
                    raise MlxVideoError(f"{target} exists, made with other settings; set \"overwrite\": true to replace it")
                options = {**options, "overwrite": True}
                job.options = options
            prepare(options, pipelines=pipelines)  # checked now; prepared again just before it runs
        except MlxVideoError as e:
            job.status, job.error = "invalid", str(e)
    return jobs


def run_batch(manifest, echo=click.echo, check_only: bool = False, after_job=None,
              summary_path: Path | None = None) -> list[BatchJob]:
    """Check, order and run a manifest's jobs (see the module docstring). `after_job(job)` is called after each
    job that ran (for progress reporting; raising KeyboardInterrupt there stops the batch like Ctrl-C)."""
    from .pipelines.base import release
    from .run import execute, prepare

    manifest = Path(manifest)
    pipelines: dict = {}
    jobs = plan_batch(manifest, pipelines)
    bad = [j for j in jobs if j.status == "invalid"]
    if bad:
        echo(f"{len(bad)} of {len(jobs)} jobs in {manifest} are invalid and will not run:", err=True)
        for j in bad:
            echo(f"  job {j.index} (line {j.line}): {j.error}", err=True)
    skipped = [j for j in jobs if j.status == "skipped"]
    if skipped:
        echo(f"{len(skipped)} jobs already done (output and sidecar match): " + ", ".join(str(j.index) for j in skipped))
    if check_only:
        write_summary(jobs, manifest, summary_path, echo)
        return jobs
    pending = [j for j in jobs if j.status == "pending"]
    order = []
    for j in pending:  # the models in order of first appearance
        key = str(j.options["model"])
        if key not in order:
            order.append(key)
    from . import distributed

    group_size, my_rank = distributed.world().size(), distributed.world().rank()
    ordered = [j for model in order for j in pending if str(j.options["model"]) == model]
    mine = {id(j) for k, j in enumerate(ordered) if k % group_size == my_rank}  # batch-parallel: job k to rank k mod N
    solo = distributed.solo() if group_size > 1 else contextlib.nullcontext()
    try:
        for model in order:
            for j in (j for j in pending if str(j.options["model"]) == model and id(j) in mine):
                echo(f"job {j.index}/{len(jobs)} (line {j.line}): {j.options['prompt'][:60]!r}")
                start = time.perf_counter()
                try:
                    with solo:
                        result = execute(prepare(j.options, pipelines=pipelines), echo)
                    j.status, j.timings = "done", dict(result["timings"])
                except KeyboardInterrupt:
                    j.status, j.error = "interrupted", "interrupted"
                    raise
                except Exception as e:  # one job's failure never stops the others
                    j.status, j.error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, MlxVideoError) else str(e)
                    echo(f"job {j.index} failed: {j.error}", err=True)
                j.timings["total"] = time.perf_counter() - start
                if after_job is not None:
                    after_job(j)
            pipelines.pop(model, None)
            release()
    finally:
        if group_size > 1:
            _merge_statuses(jobs, mine)
        if my_rank == 0:
            write_summary(jobs, manifest, summary_path, echo)
    return jobs


_STATUS_CODES = ("pending", "done", "failed", "interrupted", "invalid", "skipped")


def _merge_statuses(jobs: list, mine: set) -> None:
    """Batch-parallel: every rank learns what happened to each job (the rank that ran it says)."""
    import mlx.core as mx

    from . import distributed

    codes = mx.array([_STATUS_CODES.index(j.status) if id(j) in mine else -1 for j in jobs], dtype=mx.int32)
    everyone = mx.distributed.all_gather(codes[None], group=distributed.world()).tolist()
    for k, j in enumerate(jobs):
        reported = [row[k] for row in everyone if row[k] >= 0]
        if reported and id(j) not in mine:
            j.status = _STATUS_CODES[reported[0]]


STAGES = ("text_encoding", "image_encoding", "denoising", "decoding", "delivery", "writing", "total")


def write_summary(jobs: list[BatchJob], manifest: Path, summary_path: Path | None, echo) -> Path:
    from .io.atomic import atomic_file

    path = Path(summary_path) if summary_path else manifest.with_name(manifest.stem + ".summary.json")
    rows = [j.summary() for j in jobs]
    counts = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    header = f"{'job':>4} {'line':>5} {'status':<11} " + " ".join(f"{s[:8]:>8}" for s in STAGES) + "  output"
    echo(header)
    for r in rows:
        times = " ".join(f"{r['timings'][s]:8.1f}" if s in r["timings"] else f"{'-':>8}" for s in STAGES)
        echo(f"{r['job']:>4} {r['line']:>5} {r['status']:<11} {times}  {r['output'] or ''}"
             + (f"\n{'':>11}{r['error']}" if r["error"] and r["status"] != "interrupted" else ""))
    echo(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; summary in {path}")
    try:
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"manifest": str(manifest), "counts": counts, "jobs": rows}, indent=2, default=str) + "\n")
    except OSError as e:
        echo(f"could not write the summary {path}: {e}", err=True)
    return path
