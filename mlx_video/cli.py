"""`mlxvid`: the command line. A thin layer over the Python API; every check happens before heavy work."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import MlxVideoError
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
    """Generate videos locally with MLX: Wan 2.2 text-to-video and image-to-video.

    \b
    First convert a downloaded checkpoint once, then generate from it:
      mlxvid convert ~/Downloads/Wan2.2-TI2V-5B-Diffusers ~/models/wan5b
      mlxvid generate --model ~/models/wan5b --prompt "a corgi surfing" --output corgi.mp4
    `mlxvid models` lists the known models and their published defaults.
    """


@cli.command()
def models():
    """List the known models and their published defaults."""
    from .families import get_family

    for spec in MODELS.values():
        d = spec.defaults
        sizes = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
        guidance = f"{d.get('guidance')}" + (f" / {d.get('guidance_2')} (second expert)" if spec.experts == 2 else "")
        shape = f"{spec.experts} experts, boundary {d.get('boundary')}" if spec.experts == 2 else "one model"
        click.echo(
            f"{spec.id}  ({get_family(spec.family).title})\n  task {spec.task}, {shape}"
            f"\n  steps {d.get('steps')}, shift {d.get('shift')}, guidance {guidance}, sampler {d.get('sampler')}"
            + (f", schedule {d['schedule']}" if d.get("schedule") else "")
            + f"\n  {d.get('frames')} frames ({spec.frame_stride}n+1) at {d.get('fps')} fps; sizes {sizes}"
            + (f"\n  weights: huggingface.co/{spec.hf_repo}" if spec.hf_repo else "")
        )


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
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VAE file (official or ComfyUI) or diffusers vae/ folder.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (google/umt5-xxl) or its spiece.model / tokenizer.json.")
@click.option("--allow-unknown-keys", is_flag=True, help="Leave out tensors mlxvid does not know instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert(paths, dtype, quantize, group_size, base, transformer, transformer_2, text_encoder, vae, tokenizer,
            allow_unknown_keys, overwrite):
    """Convert checkpoints into an MLX-native model folder DST.

    \b
    SRC is a folder in any of these layouts (detected from its files and keys):
      diffusers        model_index.json, transformer/, transformer_2/, text_encoder/, tokenizer/, vae/
      official         high_noise_model/ + low_noise_model/ (or the TI2V-5B shards), models_t5_umt5-xxl-enc-bf16.pth,
                       Wan2.1_VAE.pth / Wan2.2_VAE.pth, google/umt5-xxl/
      single files     ComfyUI diffusion model / text encoder / VAE files (fp16, bf16, fp8 scaled or plain fp8)
    or one checkpoint file (taken as --transformer). Component options supply or replace parts; without SRC,
    --base names the model. DST receives safetensors shards and configs, written into DST.part and renamed at
    the end; re-running an interrupted conversion keeps the shards already written.
    """
    from tqdm.auto import tqdm

    from .convert.convert import convert_model

    if len(paths) > 2:
        raise MlxVideoError(f"convert takes [SRC] DST, got {len(paths)} paths")
    src, dst = (None, paths[0]) if len(paths) == 1 else paths
    components = {"transformer": transformer, "transformer_2": transformer_2, "text_encoder": text_encoder, "vae": vae}
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


DIFFUSERS_FILES = ["model_index.json", "transformer/*", "transformer_2/*", "text_encoder/*", "tokenizer/*", "vae/*",
                   "scheduler/*"]


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
        src = snapshot_download(repo_id=spec.hf_repo, allow_patterns=DIFFUSERS_FILES)
    except Exception as e:  # the hub library raises many kinds; all mean the same to the user
        raise MlxVideoError(
            f"could not fetch {spec.hf_repo}: {e}. Download it by other means (huggingface.co/{spec.hf_repo}) and run "
            f"`mlxvid convert PATH {dst}`"
        ) from None
    click.echo(f"converting to {dst}")
    convert_model(src, dst, dtype=dtype, overwrite=overwrite, log=click.echo)
    click.echo(f"ready: mlxvid generate --model {spec.id} --prompt ...")


@cli.command()
@click.option("--model", "-m", required=True, help="A converted model folder, or a registry id (see `mlxvid models`).")
@click.option("--prompt", "-p", required=True, help="What the video shows.")
@click.option("--image", "-i", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image to animate (I2V-A14B needs one; TI2V-5B takes one optionally). Resized to cover the video "
                   "size, then centre-cropped.")
@click.option("--image-fit", type=click.Choice(["crop", "stretch", "fit"]), default="crop", show_default=True,
              help="How the image meets the video size: crop (cover, then centre-crop, as the official TI2V code), "
                   "stretch (ignore the aspect ratio, as diffusers' Wan I2V pipeline) or fit (letterbox in black).")
@click.option("--negative-prompt", default=None, help="What to steer away from. Default: the official release's.")
@click.option("--size", default=None, metavar="WxH", help="Video size, e.g. 1280x720. Default: the model's first published size.")
@click.option("--frames", type=int, default=None, help="Number of frames, of the form 4n+1. Default: the model's (81 or 121).")
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
@click.option("--guidance-mode", type=click.Choice(["batched", "sequential"]), default="batched", show_default=True,
              help="batched runs the conditional and unconditional passes as one batch; sequential runs them one after "
                   "the other: the same result with about half the activation memory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the starting noise.")
@click.option("--init-latents", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start from these latents instead of noise: a float32 .npy of shape (1, C, T, H, W).")
@click.option("--save-latents", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the final latents (before decoding) to this .npy, same layout; a .json sidecar goes beside it.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Video to write: a .mp4/.mov file (H.264), or a folder for lossless PNG frames. A .json sidecar goes beside it.")
@click.option("--vae-tiling", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Decode in overlapping spatial tiles to bound memory; auto tiles when one frame chunk would not fit.")
@click.option("--max-memory", type=float, default=None, metavar="GB",
              help="Memory the run may use. Default: what is available now; a run estimated to need more is refused "
                   "before it starts.")
@click.option("--overwrite", is_flag=True, help="Replace output files that exist.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def generate(model, prompt, image, image_fit, negative_prompt, size, frames, fps, steps, guidance, guidance_2, true_cfg, shift, sampler,
             schedule, sigmas, timesteps, guidance_mode, seed, init_latents, save_latents, output, vae_tiling, max_memory,
             overwrite, quiet):
    """Generate a video from a text prompt (and, for image-to-video models, an image).

    Every setting left out takes the published default of the model. The run stops at the first step that
    produces NaN or infinite latents, with a message, rather than finishing as noise.
    """
    import numpy as np

    from .io.atomic import atomic_file, check_writable
    from .io.sidecar import sidecar_path, write_sidecar
    from .io.video import write_frames_png, write_video
    from .pipelines.base import GenerationSettings, Pipeline, format_bytes

    if output is None and save_latents is None:
        raise MlxVideoError("nothing would be written: pass --output VIDEO.mp4 (or a folder for PNG frames) and/or --save-latents FILE.npy")
    outputs = []
    if save_latents is not None:
        if save_latents.suffix != ".npy":
            raise MlxVideoError(f"--save-latents writes a .npy file, not {save_latents.name}")
        outputs += [save_latents, sidecar_path(save_latents)]
    if output is not None:
        if output.suffix.lower() not in ("", ".mp4", ".mov"):
            raise MlxVideoError(f"--output takes a .mp4 or .mov file, or a folder for PNG frames, not {output.name}")
        outputs += [output, sidecar_path(output)]
    for path in outputs:
        check_writable(path, overwrite)

    width, height = _parse_size(size)
    sigma_list = _parse_sigmas(sigmas, timesteps)
    if sigma_list is not None and steps is not None and steps != len(sigma_list):
        raise MlxVideoError(f"--steps {steps} disagrees with the {len(sigma_list)} values of --sigmas/--timesteps; give one")
    pipe = Pipeline.from_pretrained(model)
    settings = pipe.resolve(GenerationSettings(
        prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, frames=frames, steps=steps,
        guidance=guidance, guidance_2=guidance_2, true_cfg=true_cfg, shift=shift, sampler=sampler, schedule=schedule, sigmas=sigma_list,
        seed=seed, fps=fps, guidance_mode=guidance_mode, image=str(image) if image is not None else None,
    ))
    pixels = None
    if image is not None:
        from .io.image import fit_image, load_image

        pixels = fit_image(load_image(image), settings.width, settings.height, mode=image_fit)
    if output is not None and not pipe.can_decode:
        raise MlxVideoError(f"{pipe.folder.path} has no VAE (vae/), so it cannot write video; use --save-latents")
    pipe.vae_tile(vae_tiling, (1, 1))  # validates the option before the long work
    latents = None
    if init_latents is not None:
        try:
            latents = np.load(init_latents, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MlxVideoError(f"cannot read --init-latents {init_latents}: {e}") from None
        latents = pipe.check_init_latents(settings, latents)

    if max_memory is not None and max_memory <= 0:
        raise MlxVideoError(f"--max-memory takes a positive number of GB, not {max_memory}")
    limit = None if max_memory is None else int(max_memory * 1024**3)
    estimate = pipe.check_memory(settings, limit, vae_tiling if output is not None else "off", pixels is not None)
    if output is None:
        estimate["stages"].pop("decoding", None)
    if not quiet:
        guidance_text = f"guidance {settings.guidance}" + (
            f" / {settings.guidance_2} (high / low noise)" if settings.guidance_2 is not None else "")
        click.echo(
            f"{pipe.spec.id} ({pipe.folder.manifest['dtype']}): {settings.width}x{settings.height}, {settings.frames} "
            f"frames at {settings.fps} fps, {settings.steps} steps ({settings.sampler}, shift {settings.shift}), "
            f"{guidance_text}, seed {settings.seed}; estimated peak {format_bytes(estimate['peak_bytes'])} "
            f"({estimate['peak_stage']})"
        )
    result = pipe.generate(settings, init_latents=latents, progress=not quiet, image=pixels)
    record = settings.to_dict()
    record.update(model=pipe.spec.id, model_folder=str(pipe.folder.path), dtype=pipe.folder.manifest["dtype"],
                  init_latents=str(init_latents) if init_latents else None, experts=result.experts,
                  memory_estimate=estimate, image_fit=image_fit if image is not None else None)
    if save_latents is not None:
        with atomic_file(save_latents, overwrite=overwrite) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.latents)
        write_sidecar(save_latents, record, result.timings, overwrite=overwrite)
        click.echo(f"wrote latents {tuple(result.latents.shape)} to {save_latents}")
    if output is not None:
        start = time.perf_counter()
        video, stats = pipe.decode(result.latents, tiling=vae_tiling, progress=not quiet)
        result.timings["decoding"] = time.perf_counter() - start
        start = time.perf_counter()
        if output.suffix:
            write_video(video, output, fps=settings.fps, overwrite=overwrite)
        else:
            write_frames_png(video, output, overwrite=overwrite)
        result.timings["writing"] = time.perf_counter() - start
        record.update(stats, vae_tiling=vae_tiling)
        write_sidecar(output, record, result.timings, overwrite=overwrite)
        click.echo(f"wrote {video.shape[0]} frames of {video.shape[2]}x{video.shape[1]} to {output}")


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
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
