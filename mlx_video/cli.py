"""`mlxvid`: the command line. A thin layer over the Python API; every check happens before heavy work."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import MlxVideoError
from .extend import SegmentPromptType
from .registry import MODELS
from .samplers import SAMPLERS, SCHEDULES


def _parse_sigmas(sigmas: str | None, timesteps: str | None) -> list[float] | None:
    if sigmas is not None and timesteps is not None:
        raise MlxVideoError("give --sigmas or --timesteps, not both")
    text, option = (sigmas, "--sigmas") if sigmas is not None else (timesteps, "--timesteps")
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise MlxVideoError(f"{option} takes comma-separated numbers, e.g. 1000,750,500,250, not {text!r}") from None
    if option == "--timesteps":
        values = [v / 1000.0 for v in values]
    return values


def _parse_size(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    try:
        w, h = value.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise MlxVideoError(f"--size takes WIDTHxHEIGHT, e.g. 1280x720, not {value!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlxvid")
def cli():
    """Generate videos locally with MLX: Wan 2.2 (text and image to video), HunyuanVideo and Mochi 1.

    \b
    First convert a downloaded checkpoint once, then generate from it:
      mlxvid convert ~/Downloads/Wan2.2-TI2V-5B-Diffusers ~/models/wan5b
      mlxvid generate --model ~/models/wan5b --prompt "a corgi surfing" --output corgi.mp4
    `mlxvid models` lists the known models and their published defaults.
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def models(as_json):
    """List the known models: published defaults and sizes, quality profiles, whether and how each is converted
    here, and the estimated peak memory of a default run on this machine."""
    from .catalog import describe, model_info

    if as_json:
        import json

        click.echo(json.dumps([model_info(spec) for spec in MODELS.values()], indent=2))
        return
    for spec in MODELS.values():
        click.echo(describe(spec))
    from .recipes import describe_recipes

    click.echo(describe_recipes())


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] DST", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Precision of the written weights; the pipeline computes in it. fp32 is for parity checks.")
@click.option("--quantize", type=click.Choice(["q8", "q4", "fp8"]), default=None,
              help="Store the linear weights inside the transformer's and the text encoder's blocks as 8- or 4-bit "
                   "MLX affine integers (q8, q4) or as fp8 e4m3 codes with per-tensor scales (fp8, decoded when a "
                   "layer runs). Norms, modulation, embeddings, the head and the VAE stay in --dtype.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Inputs sharing one scale and bias in q8/q4.")
@click.option("--base", metavar="MODEL_ID", default=None,
              help="The registry model the checkpoints are (see `mlxvid models`); needed without SRC. The shapes are "
                   "checked against it.")
@click.option("--transformer", type=click.Path(path_type=Path), default=None,
              help="Diffusion transformer file or folder (the high-noise expert for A14B); supplies or replaces SRC's.")
@click.option("--transformer-2", "transformer_2", type=click.Path(path_type=Path), default=None,
              help="The low-noise expert of an A14B model (file or folder).")
@click.option("--text-encoder", type=click.Path(path_type=Path), default=None, help="UMT5 text encoder file or folder.")
@click.option("--text-encoder-2", "text_encoder_2", type=click.Path(path_type=Path), default=None,
              help="The second text encoder (HunyuanVideo's CLIP-L, e.g. ComfyUI's clip_l) file or folder.")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VAE file (official or ComfyUI) or diffusers vae/ folder.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (google/umt5-xxl) or its spiece.model / tokenizer.json.")
@click.option("--allow-unknown-keys", is_flag=True, help="Leave out tensors mlxvid does not know instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert(paths, dtype, quantize, group_size, base, transformer, transformer_2, text_encoder, text_encoder_2, vae,
            tokenizer, allow_unknown_keys, overwrite):
    """Convert checkpoints into an MLX-native model folder DST.

    \b
    SRC is a folder in any of these layouts (the family and format are detected from its files and keys):
      diffusers        model_index.json, transformer/ (transformer_2/), text_encoder/ (text_encoder_2/),
                       tokenizer/ (tokenizer_2/), vae/ -- Wan 2.2, HunyuanVideo, Mochi 1
      official         Wan: high_noise_model/ + low_noise_model/ (or the TI2V-5B shards),
                       models_t5_umt5-xxl-enc-bf16.pth, Wan2.x_VAE.pth, google/umt5-xxl/;
                       HunyuanVideo: ckpts/ with hunyuan-video-t2v-720p/ (fp8 .pt + scale map too)
      single files     ComfyUI diffusion model / text encoder / VAE / all-in-one files (fp16, bf16, fp8 scaled,
                       plain fp8, comfy_quant nvfp4 / mxfp8 / int8) and GGUF files
    or one checkpoint file (taken as --transformer). Component options supply or replace parts; without SRC,
    --base names the model. DST receives safetensors shards and configs, written into DST.part and renamed at
    the end; re-running an interrupted conversion keeps the shards already written.
    """
    from tqdm.auto import tqdm

    from .convert.convert import convert_model

    if len(paths) > 2:
        raise MlxVideoError(f"convert takes [SRC] DST, got {len(paths)} paths")
    src, dst = (None, paths[0]) if len(paths) == 1 else paths
    components = {"transformer": transformer, "transformer_2": transformer_2, "text_encoder": text_encoder,
                  "text_encoder_2": text_encoder_2, "vae": vae}
    if src is None and not any(components.values()):
        raise MlxVideoError("convert needs SRC, or component files (--transformer, --text-encoder, ...) with --base")
    bar = tqdm(desc="converting", unit="tensor")

    def progress(component: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(component)
        bar.n = done
        bar.refresh()

    try:
        convert_model(src, dst, dtype=dtype, overwrite=overwrite, progress=progress, log=click.echo, quantize=quantize,
                      group_size=int(group_size), base=base, components=components, tokenizer=tokenizer,
                      allow_unknown_keys=allow_unknown_keys)
    finally:
        bar.close()
    click.echo(f"wrote {dst}")


# What `download` fetches from a diffusers-layout repository when the family's converter names nothing else
# (`DOWNLOAD_PATTERNS` in mlx_video/convert/families/<family>.py).
DIFFUSERS_FILES = ["model_index.json", "transformer/*", "transformer_2/*", "text_encoder/*", "text_encoder_2/*",
                   "tokenizer/*", "tokenizer_2/*", "vae/*", "scheduler/*"]


@cli.command()
@click.argument("model_id")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Precision of the converted weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing converted folder.")
def download(model_id: str, dtype: str, overwrite: bool):
    """Download a registry model's diffusers weights and convert them for mlxvid.

    Only the files the pipeline needs are fetched, into the Hugging Face cache (set HF_HOME to move it;
    HF_HUB_OFFLINE=1 uses the cache alone). The converted folder goes to the models home
    (~/.cache/mlxvid/models/MODEL_ID, or $MLXVID_HOME/models/MODEL_ID), where `generate --model MODEL_ID`
    finds it.
    """
    from .convert.convert import convert_model
    from .registry import get_spec, models_home

    spec = get_spec(model_id)
    dst = models_home() / spec.id
    if (dst / "mlxvid.json").is_file() and not overwrite:
        click.echo(f"{spec.id} is already converted at {dst} (--overwrite redoes it)")
        return
    try:
        from huggingface_hub import snapshot_download

        click.echo(f"fetching {spec.hf_repo} (only the pipeline's files) into the Hugging Face cache")
        from .families import converter

        patterns = getattr(converter(spec.family), "DOWNLOAD_PATTERNS", DIFFUSERS_FILES)
        src = snapshot_download(repo_id=spec.hf_repo, allow_patterns=patterns)
    except Exception as e:  # the hub library raises many kinds; all mean the same to the user
        raise MlxVideoError(
            f"could not fetch {spec.hf_repo}: {e}. Download it by other means (huggingface.co/{spec.hf_repo}) and run "
            f"`mlxvid convert PATH {dst}`"
        ) from None
    click.echo(f"converting to {dst}")
    convert_model(src, dst, dtype=dtype, overwrite=overwrite, log=click.echo)
    click.echo(f"ready: mlxvid generate --model {spec.id} --prompt ...")


@cli.command()
@click.option("--model", "-m", default=None, help="A converted model folder, or a registry id (see `mlxvid models`). Required unless --from-sidecar.")
@click.option("--prompt", "-p", default=None, help="What the video shows. Required unless --from-sidecar.")
@click.option("--image", "-i", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image to animate (I2V-A14B needs one; TI2V-5B takes one optionally). Resized to cover the video "
                   "size, then centre-cropped.")
@click.option("--image-fit", type=click.Choice(["crop", "stretch", "fit"]), default="crop", show_default=True,
              help="How the image meets the video size: crop (cover, then centre-crop, as the official TI2V code), "
                   "stretch (ignore the aspect ratio, as diffusers' Wan I2V pipeline) or fit (letterbox in black).")
@click.option("--audio", "-a", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Voice track driving an audio-to-video model (task s2v in `mlxvid models`): wav, mp3, m4a, flac. The video "
                   "lasts as long as the audio (in whole clips) and the track is muxed into the output.")
@click.option("--pose-video", type=click.Path(path_type=Path), default=None,
              help="A pose video (or PNG folder) for an audio-driven model to follow, read from its start at the video's fps.")
@click.option("--clips", type=int, default=None, metavar="N",
              help="Audio-driven models: stop after N clips (of --frames frames each) even if the audio goes on.")
@click.option("--start-from-portrait", is_flag=True, default=None,
              help="Audio-driven models: start the first clip from the portrait as motion context (the official "
                   "--start_from_ref), so the video opens on the portrait; all of its frames are kept.")
@click.option("--negative-prompt", default=None, help="What to steer away from. Default: the official release's.")
@click.option("--size", default=None, metavar="WxH", help="Video size, e.g. 1280x720. Default: the model's first published "
              "size; for audio-driven models the portrait's aspect ratio within the model's area, in multiples of 64.")
@click.option("--frames", type=int, default=None, help="Number of frames, of the form 4n+1. Default: the model's (81 or 121). Beyond one clip, any number: "
                   "a chain of clips. For audio-driven models: frames per clip, a multiple of 4 (default 80).")
@click.option("--fps", type=int, default=None, help="Frame rate of the written video. Default: the model's (16 or 24).")
@click.option("--steps", type=int, default=None, help="Denoising steps. Default: the model's (40 or 50).")
@click.option("--guidance", type=float, default=None, help="Guidance scale (of the high-noise expert on A14B).")
@click.option("--guidance-2", type=float, default=None, help="Guidance scale of the low-noise expert (A14B only).")
@click.option("--true-cfg", type=float, default=None, help="Classifier-free guidance scale with --negative-prompt, on top of a model's embedded --guidance (HunyuanVideo).")
@click.option("--shift", type=float, default=None, help="Noise schedule shift. Default: the model's (12 or 5).")
@click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default=None,
              help="Step rule. Default: the model's (unipc for Wan, as the official release).")
@click.option("--schedule", type=click.Choice(sorted(SCHEDULES)), default=None,
              help="Sigma schedule. Default: the model's, else the sampler's own (unipc: wan, euler: shifted-linear).")
@click.option("--sigmas", default=None, metavar="S1,S2,...",
              help="An explicit, decreasing list of noise levels in (0, 1] (distilled checkpoints); sets the step count.")
@click.option("--timesteps", default=None, metavar="T1,T2,...",
              help="The same as --sigmas in timesteps (sigma x 1000), as distilled recipes publish them.")
@click.option("--lora", multiple=True, metavar="PATH[:SCALE]",
              help="A LoRA .safetensors (diffusers/PEFT, ComfyUI/lightx2v or kohya names) fused into every expert at "
                   "load, with an optional strength (default 1); repeatable.")
@click.option("--lora-high", multiple=True, metavar="PATH[:SCALE]", help="A LoRA for the high-noise expert only (A14B); repeatable.")
@click.option("--lora-low", multiple=True, metavar="PATH[:SCALE]", help="A LoRA for the low-noise expert only (A14B); repeatable.")
@click.option("--recipe", default=None, metavar="NAME",
              help="Published few-step settings (steps, shift, sampler, timesteps, guidance 1) of a distillation LoRA: "
                   "lightning, lightx2v (`mlxvid models` lists them); options given too win.")
@click.option("--cache", default=None, metavar="NAME[:THRESHOLD]",
              help="Skip transformer evaluations that earlier steps predict: easycache (default 0.05), fbcache (0.05) "
                   "or magcache (published Wan 2.2 ratios; default 0.06). Threshold 0 changes nothing.")
@click.option("--guidance-mode", type=click.Choice(["batched", "sequential"]), default="batched", show_default=True,
              help="batched runs the conditional and unconditional passes as one batch; sequential runs them one after "
                   "the other: the same result with about half the activation memory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the starting noise.")
@click.option("--init-latents", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start from these latents instead of noise: a float32 .npy of shape (1, C, T, H, W).")
@click.option("--save-latents", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the final latents (before decoding) to this .npy, same layout; a .json sidecar goes beside it.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Video to write: a .mp4/.mov file (H.264), or a folder for lossless PNG frames. A .json sidecar goes beside it. "
                   "Default (without --save-latents): PROMPT-WORDS-seedN.mp4 here, never replacing a file.")
@click.option("--vae-tiling", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Decode in overlapping spatial tiles to bound memory; auto tiles when one frame chunk would not fit.")
@click.option("--max-memory", type=float, default=None, metavar="GB",
              help="Memory the run may use. Default: what is available now; a run estimated to need more is refused "
                   "before it starts.")
@click.option("--preset", default=None, metavar="NAME",
              help="Delivery format: linkedin-square (1080x1080, 24 fps), linkedin-wide (1920x1080, 24 fps), "
                   "youtube-short (1080x1920, 30 fps), or one of yours in presets.toml. Renders at the model's nearest "
                   "published size, then scales and retimes the frames (see the README); also for a chain of clips.")
@click.option("--quality", type=click.Choice(["high", "medium", "low"]), default=None,
              help="Size class and steps for the model (`mlxvid models` lists them). Default: the published settings.")
@click.option("--duration", type=float, default=None, metavar="SECONDS",
              help="Clip length instead of --frames: the nearest frame count of the model's rule at its fps. Longer "
                   "than one clip: a chain of clips, each continuing the last (see the README's Longer videos).")
@click.option("--segment-prompt", multiple=True, type=SegmentPromptType(), metavar="TEXT[@SECONDS]",
              help="Prompt of the next segment of a chain (--prompt is the first; the last repeats), or with @SECONDS "
                   "from that time on; repeatable.")
@click.option("--segment-frames", type=int, default=None, metavar="N",
              help="Frames each segment of a chain renders (of the form 4n+1; 6n+1 for Mochi), enough to leave the "
                   "next segment's cross-fade (Wan T2V: at least 13 for three segments or more). Default: the "
                   "model's longest clip.")
@click.option("--interpolate", type=click.Choice(["2x", "4x"], case_sensitive=False), default=None,
              help="After decoding, RIFE 4.25 frame interpolation: n frames become (n - 1) x 2 or x 4 + 1, written at "
                   "the model's fps x 2 or x 4 (Wan's 16 -> 32), streamed into the output. With --preset its fps "
                   "wins: interpolation, then nearest-frame retiming (16 -> 32 -> 30). Also for a chain of clips, "
                   "streamed across its segments.")
@click.option("--rife-weights", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="RIFE 4.25 flownet.pkl or its converted folder for --interpolate [default: $MLXVID_HOME/models/rife].")
@click.option("--overlay", multiple=True, metavar="TEXT[@START-END]",
              help="Text burned into the video, from START to END seconds (default: all of it); repeatable.")
@click.option("--watermark", default=None, metavar="TEXT|IMAGE", help="A text or image watermark in a corner.")
@click.option("--watermark-corner", type=click.Choice(["top-left", "top-right", "bottom-left", "bottom-right"]),
              default=None, help="Default: the preset's (bottom-right; top-left for youtube-short).")
@click.option("--font", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A TrueType/OpenType font file for --overlay and --watermark. Default: Pillow's built-in font.")
@click.option("--preview-every", type=int, default=None, metavar="N",
              help="Every N steps, write NAME.preview.png beside the output: an approximate picture of the clip.")
@click.option("--from-sidecar", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Repeat the run a .json sidecar records (the same latents); options given too override it.")
@click.option("--overwrite", is_flag=True, help="Replace output files that exist.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def generate(**options):
    """Generate a video from a text prompt (and, for image-to-video models, an image; for audio-driven models a
    portrait --image and a voice --audio).

    Every setting left out takes the published default of the model. The run stops at the first step that
    produces NaN or infinite latents, with a message, rather than finishing as noise.
    """
    from click.core import ParameterSource

    from .run import run_generation

    ctx = click.get_current_context()
    explicit = {k for k in options if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    run_generation(options, explicit=explicit)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args):
    """Benchmarks (step, peak, vs-reference, vae, estimate): `mlxvid bench --help`.

    The harnesses live in the repository's benchmarks/ folder, not in the installed package, so this command
    needs a source checkout (pip install -e .).
    """
    import importlib.util

    harness = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
    if not harness.is_file():
        raise MlxVideoError("the benchmarks live in the source repository (benchmarks/harness.py); run mlxvid bench "
                            "from a checkout installed with `pip install -e .`")
    spec = importlib.util.spec_from_file_location("mlxvid_benchmarks_harness", harness)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bench.main(args=list(args), prog_name="mlxvid bench", standalone_mode=False)


from .interpolate import interpolate_command  # noqa: E402  (imports nothing heavy until run)

cli.add_command(interpolate_command)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--check", is_flag=True, help="Only check the manifest and say which jobs would run.")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the JSON summary. Default: MANIFEST.summary.json beside the manifest.")
def batch(manifest, check, summary):
    """Run the jobs of a JSON (list) or JSON Lines MANIFEST; re-running it resumes.

    Each job's keys are generate's option names with _ for - (prompt, model, preset, quality, duration, seed,
    output, overlay, ...). Every job is checked before any model loads; jobs run grouped by model; a failed
    job does not stop the others; jobs whose output and sidecar already match are skipped.
    """
    from .batch import run_batch

    jobs = run_batch(manifest, generate, check_only=check, summary_path=summary)
    if any(j.status in ("invalid", "failed") for j in jobs):
        sys.exit(1)


@cli.command()
@click.argument("latents", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Video (.mp4/.mov) or PNG folder.")
@click.option("--model", "-m", default=None, help="Model folder or id. Default: the one the latents' sidecar names.")
@click.option("--overwrite", is_flag=True, help="Replace output files that exist.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def decode(latents, output, model, overwrite, quiet):
    """Decode saved latents (a .npy from --save-latents, or kept after a failed write) into a video.

    The .json sidecar beside the latents supplies the model, frame rate, preset, overlays and watermark.
    """
    from .run import decode_latents

    decode_latents(latents, output, model=model, overwrite=overwrite, quiet=quiet)


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="mlxvid", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MlxVideoError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except RuntimeError as e:
        if "[ring]" not in str(e) and "peer" not in str(e):
            raise
        # mx.distributed: another process of the group stopped; outputs are written at the end, atomically
        click.echo(f"error: another rank of the group stopped ({e}); this rank stops too and nothing was written",
                   err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
