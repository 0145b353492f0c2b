"""Longer videos: `--duration` (or `--frames`) beyond one clip makes a chain of clips ("segments"), each
conditioned on the end of the one before, generated one after another and written as they come.

    mlxvid generate --model wan2.2-t2v-a14b --prompt "a fox runs through snow" --duration 30
    mlxvid generate --model wan2.2-ti2v-5b --prompt "a corgi surfs" --duration 20 \\
        --segment-prompt "the corgi rides the wave to the beach@8" --segment-prompt "the corgi shakes off water@15"

How a segment continues the previous one depends on what the model takes:

* Last-frame image conditioning (models that take an image: Wan I2V-A14B "channels", Wan TI2V-5B
  "first_frame"). Segment k > 0 is generated with the previous segment's last written frame as its image;
  its own first frame, which reproduces that image, is dropped (no cross-fade is needed: the frames meet at
  one shared picture). These models were trained to start a clip from a given picture, so the conditioning
  is what they know; motion direction and speed are not carried over (one frame holds none), which is the
  known price of this method.
* Latent overlap (text-only models: Wan T2V-A14B, HunyuanVideo, Mochi). The next segment's first
  K = OVERLAP_LATENT_FRAMES = 2 latent frames are held to the previous segment's last K latent frames x0:
  they start at, and after every sampler step are reset to, x0 re-noised to the σ that step ends at,
  x_σ = (1 − σ)·x0 + σ·ε with ε the segment's own seeded noise; after the last step (σ = 0) they equal x0.
  The rest of the clip is denoised around them, so it continues the motion of the overlap. The K held
  latent frames decode to stride·(K − 1) + 1 frames (5 for Wan and HunyuanVideo, 7 for Mochi), which cover
  the previous segment's last frames in time; because the causal VAE decodes them with a different context,
  the two versions are cross-faded linearly: overlap frame j of O gets weight (j + 1)/(O + 1) from the new
  segment and the rest from the previous one. These models take no image, so the latents are the only way
  to pass the past in.

Frames: the total is round(seconds · fps) (or --frames); each segment renders at most the model's longest
clip (or --segment-frames, of the form stride·n + 1); the last segment renders the fewest frames of the
model's rule that reach the total, and the output is cut to exactly the total.

Seeds and prompts per segment: segment k uses seed + k. --prompt is segment 0's prompt; --segment-prompt
(repeatable) gives segments 1, 2, ... in order (the last one repeated), or, written TEXT@SECONDS (a manifest
may give {"at": SECONDS, "prompt": TEXT, "seed": N}), a timed list: each segment takes the last entry whose time
is at or before the time its new frames start (--prompt before the first entry).

Memory stays that of one clip: each segment loads and releases its models as a one-clip run does; only the
previous segment's last latent frames (or last frame) and, for the overlap, its last O decoded frames are
kept; frames are encoded into the output as each segment finishes (written under a temporary name and
renamed at the end, as every output). The sidecar lists the segments: index, frame range in the output,
seed, prompt, conditioning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from mlx_video.errors import MlxVideoError
from mlx_video.options import MAX_VIDEO_SECONDS, parse_segment_prompt

OVERLAP_LATENT_FRAMES = 2  # K: latent frames held between segments on text-only models
# what each segment's record keeps of its run's step-cache counts (mlx_video.pipelines.cache.StepCache.stats)
CACHE_COUNTS = ("transformer_evals", "transformer_evals_uncached", "reused_steps", "forecast_steps")
LAST_FRAME, LATENT_OVERLAP = "last frame", "latent overlap"
# one-clip options a chain does not support yet
UNSUPPORTED = {"save_latents": "--save-latents", "init_latents": "--init-latents"}


# ---- the plan ----

@dataclass
class Segment:
    index: int
    rendered: int  # frames the segment renders (stride*n + 1)
    start: int  # first output frame its pixels reach (cross-faded from here over `overlap` frames)
    boundary: int  # first output frame that is its own alone
    end: int  # one past its last output frame
    overlap: int  # output frames cross-faded with the previous segment
    conditioning: str  # "none", "image", LAST_FRAME or LATENT_OVERLAP
    prompt: str = ""
    seed: int = 0
    timings: dict = field(default_factory=dict)
    evaluations: dict = field(default_factory=dict)  # the step cache's counts (CACHE_COUNTS)

    def record(self) -> dict:
        return {"index": self.index, "frames": [self.start, self.end], "new_frames_from": self.boundary,
                "rendered_frames": self.rendered, "overlap_frames": self.overlap, "seed": self.seed,
                "prompt": self.prompt, "conditioning": self.conditioning, "timings": self.timings,
                **self.evaluations}


def overlap_frames(method: str, stride: int, k: int = OVERLAP_LATENT_FRAMES) -> int:
    """Frames at the start of a segment k > 0 that repeat the past: the decoded held latents, or the image."""
    return stride * (k - 1) + 1 if method == LATENT_OVERLAP else 1


def plan_segments(total: int, clip: int, stride: int, method: str, first_conditioning: str = "none",
                  k: int = OVERLAP_LATENT_FRAMES) -> list[Segment]:
    """Split `total` output frames into segments of at most `clip` rendered frames (see the module docstring)."""
    repeat = overlap_frames(method, stride, k)
    blend = repeat if method == LATENT_OVERLAP else 0

    def refuse(needed: int):
        need = stride * math.ceil((repeat + needed - 1) / stride) + 1
        raise MlxVideoError(f"a segment of {clip} frames leaves {max(0, clip - repeat)} new frames after the {repeat} "
                            f"it shares with the previous one, fewer than the {needed} needed; --segment-frames "
                            f"must be at least {need}")

    if clip - repeat < stride:
        refuse(stride)

    first = min(clip, stride * math.ceil((total - 1) / stride) + 1) if total > 1 else 1
    segments = [Segment(0, first, 0, 0, min(first, total), 0, first_conditioning)]
    while segments[-1].end < total:
        produced, left = segments[-1].end, total - segments[-1].end
        # repeat = 1 (mod stride): the fewest frames of the model's rule that give `left` new ones
        rendered = min(clip, repeat + stride * math.ceil(left / stride))
        new = min(rendered - repeat, left)
        segments.append(Segment(len(segments), rendered, produced - blend, produced, produced + new, blend, method))
    if len(segments) > 2 and clip - repeat < blend:  # a middle segment's new frames hold the next cross-fade
        refuse(blend)
    return segments


def assign_prompts(segments: list[Segment], prompt: str, entries, seed: int, fps: float) -> None:
    """Prompt and seed of each segment from --prompt, --segment-prompt entries and --seed."""
    entries = [parse_segment_prompt(e) for e in (entries or ())]
    timed = [e["at"] is not None for e in entries]
    if any(timed) and not all(timed):
        raise MlxVideoError("--segment-prompt values must be all timed (TEXT@SECONDS) or all untimed")
    duration = segments[-1].end / fps
    if entries and not any(timed) and len(entries) > len(segments) - 1:
        raise MlxVideoError(f"{len(entries)} --segment-prompt values but {len(segments) - 1} segments after the first "
                            f"({len(segments)} in all; --prompt is the first's); give at most {len(segments) - 1}")
    for e in entries:
        if e["at"] is not None and e["at"] >= duration:
            raise MlxVideoError(f"--segment-prompt at {e['at']:g} s is past the end of the video ({duration:g} s)")
    entries = sorted(entries, key=lambda e: e["at"]) if any(timed) else entries
    for seg in segments:
        entry = None
        if any(timed):
            started = [e for e in entries if e["at"] <= seg.boundary / fps + 1e-9]
            entry = started[-1] if started else None
        elif seg.index > 0 and entries:
            entry = entries[min(seg.index, len(entries)) - 1]
        seg.prompt = entry["prompt"] if entry else prompt
        seg.seed = entry["seed"] if entry and entry["seed"] is not None else (seed + seg.index) % 2**64


# ---- when a run is a chain ----

def extension_frames(o: dict, spec) -> tuple[int, int] | None:
    """(total output frames, frames per segment) when the (validated) options ask for a chain, else None (one
    clip). A chain is at most MAX_VIDEO_SECONDS long at the model's fps."""
    prompts, clip = o.get("segment_prompt") or (), o.get("segment_frames")
    stride = spec.frame_stride
    longest = int(spec.default("max_frames") or spec.default("frames"))
    if clip is not None and ((clip - 1) % stride or clip > longest):
        raise MlxVideoError(f"--segment-frames must be of the form {stride}n+1 and at most {longest} "
                            f"({spec.id}'s longest clip), got {clip!r}")
    limit = clip or longest
    fps = o.get("fps") or spec.default("fps")
    if o.get("duration") is not None:
        seconds = o["duration"]
        nearest = stride * max(1, math.floor((seconds * fps - 1) / stride + 0.5)) + 1  # the one-clip rule
        total = max(1, round(seconds * fps))
    elif o.get("frames") is not None:
        nearest = total = o["frames"]
    elif prompts or clip is not None:
        raise MlxVideoError("--segment-prompt and --segment-frames make a chain of clips: give its length with "
                            "--duration or --frames")
    else:
        return None
    if nearest <= limit and clip is None and not prompts:
        return None
    most = int(MAX_VIDEO_SECONDS * fps)
    if total > most:
        what = f"--duration {o['duration']:g}" if o.get("duration") is not None else f"--frames {total}"
        raise MlxVideoError(f"{what} is longer than a chain of clips may be: at most {MAX_VIDEO_SECONDS} s, "
                            f"{most} frames at {spec.id}'s {fps:g} fps")
    return total, limit


@dataclass
class ChainJob:
    """A chain of clips settled and checked (segment 0 prepared as a one-clip job), ready to run."""

    options: dict
    base: object  # run.Job of segment 0
    segments: list[Segment]
    method: str
    total: int
    clip: int
    overlap_latent_frames: int

    @property
    def output(self) -> Path:
        return self.base.output

    def record(self) -> dict:
        record = self.base.record(options=self.options)
        fps = self.base.settings.fps
        record.update(frames=self.total, duration=self.options.get("duration") or self.total / fps,
                      seed=self.base.settings.seed, prompt=self.base.settings.prompt)
        record["extension"] = {
            "method": self.method, "segments": len(self.segments), "segment_frames": self.clip,
            "overlap_latent_frames": self.overlap_latent_frames if self.method == LATENT_OVERLAP else None,
            "overlap_frames": self.segments[1].overlap if len(self.segments) > 1 else 0,
            "blend": ("linear cross-fade, weight (j+1)/(O+1) for the new segment" if self.method == LATENT_OVERLAP
                      else "the repeated first frame of each later segment is dropped"),
        }
        record["segments"] = [s.record() for s in self.segments]
        return record

    def summary(self) -> str:
        s = self.base.settings
        return (f"{len(self.segments)} segments ({self.method}) of at most {self.clip} frames for {self.total} frames "
                f"({self.total / s.fps:g} s at {s.fps} fps); each: " + self.base.summary())

    def execute(self, echo=click.echo, hooks=()) -> dict:
        return run_chain(self, echo, hooks)


def plan_chain(o: dict, pipe, total: int, clip: int, k: int = OVERLAP_LATENT_FRAMES) -> tuple[list[Segment], str, dict]:
    """Check a chain's options and plan its segments: (segments, method, the options of segment 0 as a one-clip
    job, which the caller prepares; memory is checked for one clip)."""
    from mlx_video.distributed import world_size

    for name, option in UNSUPPORTED.items():
        if o.get(name) not in (None, (), [], False):
            raise MlxVideoError(f"{option} is not supported with a video longer than one clip (a chain of "
                                "segments) yet")
    if world_size() > 1:
        raise MlxVideoError("a chain of segments runs on one process; launch it without mlx.launch")
    spec = pipe.spec
    method = LAST_FRAME if pipe.image_mode is not None else LATENT_OVERLAP
    segments = plan_segments(total, clip, spec.frame_stride, method, "image" if o.get("image") else "none", k)
    first = dict(o, frames=segments[0].rendered, duration=None, segment_prompt=None, segment_frames=None,
                 upscale="none")  # a preset's super-resolution stage is for one clip (mlx_video.upscale)
    return segments, method, first


def chain_job(o: dict, base, segments: list[Segment], method: str, total: int, clip: int,
              k: int = OVERLAP_LATENT_FRAMES) -> ChainJob:
    """The chain, from segment 0 prepared as a one-clip job (`base`, a run.Job)."""
    if base.output is None:
        raise MlxVideoError("a chain of segments writes a video: give --output")
    assign_prompts(segments, base.settings.prompt, o.get("segment_prompt"), base.settings.seed, base.settings.fps)
    options = dict(o, output=str(base.output))
    return ChainJob(options, base, segments, method, total, clip, k)


# ---- running ----

class HoldLatents:
    """A step hook holding the first K latent frames (channels-last (1, T, H, W, C)) at x0 re-noised to the σ the
    step ends at: (1 − σ)·x0 + σ·noise. `sigmas` is the sampler's grid with the final 0."""

    def __init__(self, x0, noise, sigmas):
        self.x0, self.noise = x0, noise
        self.sigmas = [float(v) for v in sigmas]
        self.k = x0.shape[1]

    def at(self, sigma: float):
        return (1.0 - sigma) * self.x0 + sigma * self.noise

    def start(self, noise):
        """The segment's starting latents: its noise with the held frames at the first σ."""
        import mlx.core as mx

        return mx.concatenate([self.at(self.sigmas[0]), noise[:, self.k:]], axis=1)

    def __call__(self, i: int, t, latents):
        import mlx.core as mx

        return mx.concatenate([self.at(self.sigmas[i + 1]), latents[:, self.k:]], axis=1)


def crossfade(previous: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Linear cross-fade of two equally long uint8 frame runs: frame j takes (j+1)/(O+1) of `new`."""
    o = previous.shape[0]
    w = (np.arange(1, o + 1, dtype=np.float32) / (o + 1))[:, None, None, None]
    mixed = (1.0 - w) * previous.astype(np.float32) + w * new.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def segment_runs(job: ChainJob, hooks=(), progress: bool = False, echo=None, start: int = 0,
                 previous: tuple = (None, None)):
    """Generate the segments in order from segment `start`; yields (segment, GenerationResult, decoded uint8
    frames). Only what the next segment needs is kept between iterations: `previous` is that of segment
    start - 1 (its latents, at least their last K frames, and its last decoded frame)."""
    import mlx.core as mx

    from mlx_video.pipelines.base import GenerationSettings

    pipe, base = job.base.pipe, job.base
    previous_latents, previous_frame = previous
    for seg in job.segments[start:]:
        s = GenerationSettings.from_dict({**base.settings.to_dict(), "prompt": seg.prompt, "seed": seg.seed,
                                          "frames": seg.rendered})
        pixels, init, extra = base.pixels if seg.index == 0 else None, None, []
        if seg.conditioning == LAST_FRAME:
            pixels = previous_frame.astype(np.float32) / 127.5 - 1.0
            s.image = f"<last frame of segment {seg.index - 1}>"
        s = pipe.resolve(s)
        if seg.conditioning == LATENT_OVERLAP:
            k = job.overlap_latent_frames
            x0 = mx.array(previous_latents[:, :, -k:]).transpose(0, 2, 3, 4, 1)
            noise = pipe.initial_latents(s, None)
            hold = HoldLatents(x0, noise[:, :k], pipe.make_sampler(s).sigmas)
            init = np.array(hold.start(noise).transpose(0, 4, 1, 2, 3))
            extra = [hold]
        if base.preview_every:  # NAME.preview.png shows the segment being made
            from mlx_video.preview import make_preview_hook

            extra.append(make_preview_hook(pipe, s, init, base.output, base.preview_every,
                                           echo if seg.index == start else None))
        if echo is not None:
            echo(f"segment {seg.index + 1}/{len(job.segments)}: frames {seg.start}-{seg.end - 1}, seed {seg.seed}, "
                 f"{seg.conditioning}: {seg.prompt[:60]!r}")
        result = pipe.generate(s, init_latents=init, progress=progress, image=pixels, hooks=[*extra, *hooks])
        start = time.perf_counter()
        frames, stats = pipe.decode(pipe.video_latents(result.latents, s), tiling=base.vae_tiling, progress=progress)
        result.timings["decoding"] = time.perf_counter() - start
        result.stats = {**(result.stats or {}), **stats}
        yield seg, result, frames
        previous_latents, previous_frame = result.latents, frames[-1]
        del result, frames


class SegmentStore:
    """Finished segments of a chain, kept beside its output until the chain is written, so that an interrupted
    chain resumes where it stopped: per segment the frames it adds to the output (before interpolation and
    delivery), the frames held back for the next cross-fade, its last K latent frames and last decoded frame.
    A fingerprint of what decides the frames (the model folder, the resolved settings, the segment plan) must
    match, so a changed command starts over, while interpolation and delivery options may change freely.
    A pipeline that makes its own segments keeps them the same way (`SegmentStore(output, key)`)."""

    def __init__(self, output: Path, key: dict):
        import hashlib
        import json

        self.folder = output.with_name(f".{output.name}.segments")
        self.fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def for_chain(cls, job: ChainJob) -> "SegmentStore":
        from mlx_video.distributed import folder_fingerprint

        plan = [(g.rendered, g.start, g.boundary, g.end, g.prompt, g.seed, g.conditioning) for g in job.segments]
        key = {"model": folder_fingerprint(job.base.pipe.folder.path), "settings": job.base.settings.to_dict(),
               "plan": plan, "method": job.method, "k": job.overlap_latent_frames,
               "image": _image_digest(job.base.pixels)}
        return cls(job.base.output, key)

    def finished(self) -> int:
        """How many leading segments are kept for this chain (0 when none, or kept for another command)."""
        import json

        try:
            record = json.loads((self.folder / "chain.json").read_text())
        except (OSError, ValueError):
            return 0
        if record.get("fingerprint") != self.fingerprint:
            return 0
        count = 0
        while (self.folder / f"segment-{count:03d}.npz").is_file():
            count += 1
        return count

    def load(self, index: int) -> dict:
        import json

        with np.load(self.folder / f"segment-{index:03d}.npz", allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
        out["timings"] = json.loads(str(out.pop("timings_json")))
        out["evaluations"] = json.loads(str(out.pop("evaluations_json", "{}")))
        return out

    def save(self, index: int, frames, tail, latents, last_frame, timings: dict, evaluations: dict) -> None:
        import json

        from mlx_video.io.atomic import atomic_file

        if index == 0 or not (self.folder / "chain.json").is_file():
            if self.folder.exists():
                for old in self.folder.glob("segment-*.npz"):
                    old.unlink()
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / "chain.json").write_text(json.dumps({"fingerprint": self.fingerprint}))
        arrays = {"frames": np.asarray(frames, dtype=np.uint8), "latents": latents, "last_frame": last_frame,
                  "timings_json": np.array(json.dumps(timings)), "evaluations_json": np.array(json.dumps(evaluations))}
        if tail is not None:
            arrays["tail"] = tail
        with atomic_file(self.folder / f"segment-{index:03d}.npz", overwrite=True, now=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _image_digest(pixels) -> str | None:
    import hashlib

    return None if pixels is None else hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def chain_frames(job: ChainJob, timings: dict, hooks=(), echo=None, store: SegmentStore | None = None):
    """The chain's output frames in order, made segment by segment: the cross-faded overlaps, the repeated
    conditioning frames dropped. `timings` gathers each stage's seconds over the segments. With a `store`, the
    segments it keeps are read back instead of made, and each new one is kept there before its frames go on."""
    k = job.overlap_latent_frames
    done = store.finished() if store is not None else 0
    tail, previous = None, (None, None)
    for seg in job.segments[:done]:
        kept = store.load(seg.index)
        yield from kept["frames"]
        tail, previous = kept.get("tail"), (kept["latents"], kept["last_frame"])
        seg.timings, seg.evaluations = kept["timings"], kept["evaluations"]
        for name, seconds in seg.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds
    if done and echo is not None:
        echo(f"resuming: segments 1-{done} of {len(job.segments)} read back from {store.folder}")
    runs = segment_runs(job, hooks, progress=not job.base.quiet, echo=echo, start=done, previous=previous)
    for seg, result, frames in runs:
        start = time.perf_counter()
        out = []
        own = frames
        if seg.conditioning == LATENT_OVERLAP:
            out.extend(crossfade(tail, frames[:seg.overlap]))
            own = frames[seg.overlap:]
        elif seg.conditioning == LAST_FRAME:
            own = frames[1:]  # the conditioning image again
        own = own[: seg.end - seg.boundary]
        seg.evaluations = {name: result.stats[name] for name in CACHE_COUNTS if name in (result.stats or {})}
        last = seg.index == len(job.segments) - 1
        keep = job.segments[seg.index + 1].overlap if not last else 0
        out.extend(own[: len(own) - keep])
        tail = own[len(own) - keep:].copy() if keep else None
        if store is not None:
            result.timings["keeping"] = time.perf_counter() - start
            seg.timings = {name: round(v, 3) for name, v in result.timings.items()}
            store.save(seg.index, out, tail, result.latents[:, :, -k:], frames[-1], seg.timings, seg.evaluations)
        start = time.perf_counter()
        for frame in out:
            yield np.ascontiguousarray(frame)
        result.timings["writing"] = time.perf_counter() - start  # with interpolation and delivery, if any
        seg.timings = {name: round(v, 3) for name, v in result.timings.items()}
        for name, seconds in result.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds


def run_chain(job: ChainJob, echo=click.echo, hooks=()) -> dict:
    """Run the segments and stream their frames into the output (atomically) as they are made, through RIFE
    interpolation and the delivery step (preset, overlays, watermark) when asked, then write the sidecar."""
    from mlx_video.interpolate import output_frame_count
    from mlx_video.io.atomic import publishing
    from mlx_video.io.sidecar import write_sidecar
    from mlx_video.io.frames import CountedFrames, stream_frames

    base, output = job.base, job.base.output
    s = base.settings
    if not base.quiet:
        echo(job.summary())
    timings: dict[str, float] = {}
    store = SegmentStore.for_chain(job)
    made = CountedFrames(chain_frames(job, timings, hooks, None if base.quiet else echo, store))
    frames, total, fps = made, job.total, s.fps
    interpolator = None
    if base.interpolation is not None:
        interpolator = base.interpolation.interpolator()
        frames = CountedFrames(interpolator(made))
        total, fps = output_frame_count(job.total, base.interpolation.factor), base.frame_rate
    delivered, (width, height, out_fps), planned = base.deliver(frames, total, fps, (s.width, s.height, fps))
    with publishing():  # the video and its sidecar appear together
        try:
            written = stream_frames(delivered, output, base.overwrite, width, height, out_fps)
        except BaseException:  # Ctrl-C included: say where the finished segments are
            kept = store.finished()
            if kept:
                echo(f"{kept} of {len(job.segments)} segments are kept in {store.folder}; the same command resumes "
                     "from there", err=True)
            raise
        if made.count != job.total or frames.count != total or written != planned:  # the plan is exact
            raise MlxVideoError(f"internal error: made {made.count} frames ({frames.count} after interpolation) and "
                                f"wrote {written}, planned {job.total} ({total}) and {planned}")
        record = job.record()
        if interpolator is not None:
            record["interpolate"] = base.interpolation.record(job.total, total, s.fps, fps, interpolator.scene_cuts)
        record.update(vae_tiling=base.vae_tiling, output_frames=written, output_fps=out_fps)
        for name in ("transformer_evals", "transformer_evals_uncached"):  # over the segments (each has its own)
            record[name] = sum(seg.evaluations.get(name, 0) for seg in job.segments)
        write_sidecar(output, record, timings, overwrite=base.overwrite or base.own_sidecar)
    store.remove()
    echo(f"wrote {written} frames of {width}x{height} ({len(job.segments)} segments) to {output}")
    return {"settings": s, "outputs": [output], "timings": timings, "record": record, "pipe": base.pipe,
            "latents": None, "segments": [seg.record() for seg in job.segments]}

