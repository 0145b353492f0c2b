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

PATH_KEYS = tuple(o.name for o in GENERATE_OPTIONS if o.kind in ("path", "output"))  # relative to the manifest's folder


@dataclass
class BatchJob:
    index: int  # 1-based position in the manifest
    line: int
    options: dict
    status: str = "pending"  # pending | invalid | skipped | done | failed | interrupted
    error: str | None = None
    timings: dict = field(default_factory=dict)
    own_sidecar: bool = False  # its sidecar records it but its output was deleted: re-made, the record replaced

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


def check_inside(key: str, given, path: Path, base: Path) -> None:
    """A manifest's outputs stay inside its folder (a manifest someone sends cannot write elsewhere on disk)."""
    if Path(str(given)).is_absolute():
        raise MlxVideoError(f"{key} {given} is an absolute path; a manifest's outputs stay inside its folder "
                            f"{base} unless the command says --outputs-anywhere")
    try:
        path.resolve().relative_to(base.resolve())
    except ValueError:
        raise MlxVideoError(f"{key} {given} leads out of the manifest's folder {base}; outputs stay inside it "
                            "unless the command says --outputs-anywhere") from None


def _job_options(entry: dict, base: Path, outputs_anywhere: bool = False) -> dict:
    """The entry checked by the option schema (`mlx_video.options.validate`, every problem named at once), with
    relative paths taken from the manifest's folder `base` (an output's trailing /, a PNG folder, kept), and
    outputs kept inside it unless `outputs_anywhere`."""
    options = validate(entry, all_problems=True)
    for key in PATH_KEYS:
        value = options.get(key)
        if isinstance(value, tuple):  # a repeatable path option (--reference-image)
            options[key] = tuple(_in_folder(v, base) for v in value)
        elif value is not None:
            options[key] = _in_folder(value, base)
    for key in ("output", "save_latents"):
        if options.get(key) is not None and not outputs_anywhere:
            check_inside(key, entry[key], Path(options[key]), base)
    mark = options.get("watermark")
    if mark and not Path(mark).is_absolute() and (base / mark).is_file():
        options["watermark"] = str(base / mark)
    model = options.get("model")
    if model is not None and not Path(str(model)).is_absolute() and (base / str(model)).exists():
        options["model"] = str(base / str(model))
    return options


def _in_folder(path, base: Path):
    """A relative path taken from the manifest's folder (an output's trailing / kept); an absolute one as is."""
    if Path(path).is_absolute():
        return path
    text = str(path)
    return str(base / text) + "/" if text.endswith("/") else base / text


def _default_output(manifest: Path, index: int, prompt: str) -> str:
    import re

    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].strip("-") or "video"
    return str(manifest.parent / f"{manifest.stem}-{index:03d}-{slug}.mp4")


def job_state(options: dict) -> str:
    """"done": the output and a sidecar recording these options exist; "own record": the sidecar recording these
    options is there without the output (the job is re-run and its record replaced); "taken": the output, or its
    sidecar, exists and is not this job's; "absent": neither is there."""
    from .io.sidecar import sidecar_path
    from .run import read_sidecar

    target = options.get("output") or options.get("save_latents")
    car = sidecar_path(target)
    there = Path(target).exists()
    if not car.is_file():
        return "taken" if there or car.exists() else "absent"
    try:
        recorded = read_sidecar(car).get("options")
    except MlxVideoError:
        return "taken"
    if recorded != recorded_options(options):
        return "taken"
    return "done" if there else "own record"


def plan_batch(manifest: Path, pipelines: dict, outputs_anywhere: bool = False) -> list[BatchJob]:
    """Read and check every entry (no weights are read); returns the jobs with their status. Outputs must stay
    inside the manifest's folder unless `outputs_anywhere`."""
    from .run import prepare

    manifest = Path(manifest)
    jobs, targets = [], {}
    for index, (line, entry) in enumerate(read_manifest(manifest), 1):
        job = BatchJob(index, line, entry if isinstance(entry, dict) else {})
        jobs.append(job)
        try:
            if not isinstance(entry, dict):
                raise MlxVideoError(f"a job is a JSON object, not {type(entry).__name__}")
            options = _job_options(entry, manifest.parent, outputs_anywhere)
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
            state = job_state(options)
            if state == "done":
                job.status = "skipped"
                continue
            job.own_sidecar = state == "own record"  # its video was deleted: made again, its record replaced
            if state == "taken" and not options.get("overwrite"):
                target = options.get("output") or options.get("save_latents")
                raise MlxVideoError(f"{target} (or its .json sidecar) exists and was not made by this job; set "
                                    "\"overwrite\": true to replace it, or choose another output")
            prepare(options, pipelines=pipelines, own_sidecar=job.own_sidecar)  # checked now; again before it runs
        except MlxVideoError as e:
            job.status, job.error = "invalid", str(e)
    return jobs


def jobs_text(n: int) -> str:
    return f"{n} job" + ("" if n == 1 else "s")


@contextlib.contextmanager
def manifest_lock(manifest: Path):
    """Hold an exclusive lock on the manifest file while its jobs run: a second `mlxvid batch` on the same
    manifest is refused at once instead of doing every job again."""
    import fcntl

    with open(manifest, "rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MlxVideoError(f"another mlxvid batch is running {manifest}; wait for it to finish (it resumes "
                                "from what that run made) or stop it") from None
        except OSError:  # a file system without locks
            pass
        yield


def run_batch(manifest, echo=click.echo, check_only: bool = False, after_job=None, summary_path: Path | None = None,
              outputs_anywhere: bool = False) -> list[BatchJob]:
    """Check, order and run a manifest's jobs (see the module docstring). `after_job(job)` is called after each
    job that ran (for progress reporting; raising KeyboardInterrupt there stops the batch like Ctrl-C). One run
    at a time per manifest (`manifest_lock`)."""
    from . import distributed

    manifest = Path(manifest)
    lock = manifest_lock(manifest) if distributed.world().rank() == 0 else contextlib.nullcontext()
    with lock:
        return _run_batch(manifest, echo, check_only, after_job, summary_path, outputs_anywhere)


def _report_plan(jobs: list[BatchJob], manifest: Path, echo) -> None:
    """Say which jobs are invalid (and why) and which are already done."""
    bad = [j for j in jobs if j.status == "invalid"]
    if bad:
        echo(f"{len(bad)} of {jobs_text(len(jobs))} in {manifest} {'is' if len(bad) == 1 else 'are'} invalid and "
             "will not run:", err=True)
        for j in bad:
            echo(f"  job {j.index} (line {j.line}): {j.error}", err=True)
    skipped = [j for j in jobs if j.status == "skipped"]
    if skipped:
        echo(f"{jobs_text(len(skipped))} already done (output and sidecar match): "
             + ", ".join(str(j.index) for j in skipped))


def _run_batch(manifest, echo, check_only, after_job, summary_path, outputs_anywhere) -> list[BatchJob]:
    from .pipelines.base import release
    from .run import execute, prepare

    pipelines: dict = {}
    jobs = plan_batch(manifest, pipelines, outputs_anywhere)
    if not jobs:
        raise MlxVideoError(f"{manifest} holds no jobs (a JSON list of objects, or one JSON object a line)")
    _report_plan(jobs, manifest, echo)
    if check_only:
        write_summary(jobs, manifest, summary_path, echo)
        return jobs
    if my_rank_writes():
        from .run import check_output_writable

        check_output_writable(summary_file(manifest, summary_path), True, "--summary")  # before any job runs
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
                        result = execute(prepare(j.options, pipelines=pipelines, own_sidecar=j.own_sidecar), echo)
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


def my_rank_writes() -> bool:
    from . import distributed

    return distributed.world().rank() == 0


def summary_file(manifest: Path, summary_path: Path | None) -> Path:
    return Path(summary_path) if summary_path else manifest.with_name(manifest.stem + ".summary.json")


STAGES = ("text_encoding", "image_encoding", "denoising", "decoding", "delivery", "writing", "total")


def write_summary(jobs: list[BatchJob], manifest: Path, summary_path: Path | None, echo) -> Path:
    from .io.atomic import atomic_file

    path = summary_file(manifest, summary_path)
    rows = [j.summary() for j in jobs]
    counts = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    widths = [max(8, len(s)) for s in STAGES]
    header = f"{'job':>4} {'line':>5} {'status':<11} " + " ".join(f"{s:>{w}}" for s, w in zip(STAGES, widths)) + "  output"
    echo(header)
    for r in rows:
        times = " ".join(f"{r['timings'][s]:{w}.1f}" if s in r["timings"] else f"{'-':>{w}}"
                         for s, w in zip(STAGES, widths))
        echo(f"{r['job']:>4} {r['line']:>5} {r['status']:<11} {times}  {r['output'] or ''}"
             + (f"\n{'':>11}{r['error']}" if r["error"] and r["status"] != "interrupted" else ""))
    echo(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; summary in {path}")
    try:
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"manifest": str(manifest), "counts": counts, "jobs": rows}, indent=2, default=str) + "\n")
    except OSError as e:
        echo(f"could not write the summary {path}: {e}", err=True)
    return path
