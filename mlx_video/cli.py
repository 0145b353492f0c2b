"""`mlxvid`: the command line. A thin layer over the Python API; every check happens before heavy work."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import MlxVideoError
from .options import GENERATE_OPTIONS, OPTIONS, Option
from .registry import MODELS


class SchemaValue(click.ParamType):
    """A click type that checks a value with its option's schema entry (`mlx_video.options`): the command line
    refuses with the same words as a manifest or a request body (a MlxVideoError, printed by `main`)."""

    def __init__(self, option: Option):
        self.option = option
        self.name = option.kind

    def convert(self, value, param, ctx):
        return self.option.convert_one(value)


def schema_option(option: Option, **overrides):
    """The click option of a schema entry; `overrides` change its click settings for one command."""
    decls = [option.flag] + ([option.short] if option.short else []) + [option.name]
    settings = dict(help=option.help_text(), default=option.default, metavar=option.metavar)
    if option.kind == "flag":
        settings.update(is_flag=True, metavar=None)
    else:
        settings.update(type=SchemaValue(option), multiple=option.multiple,
                        show_default=option.default is not None)
        if option.choices and not option.metavar:
            settings["metavar"] = "[" + "|".join(option.choice_list()) + "]"
    if option.multiple:
        settings["default"] = ()
    settings.update(overrides)
    return click.option(*decls, **settings)


def schema_options(command: str):
    """Every schema option of `command`, in the table's order."""
    def decorate(f):
        for option in reversed([o for o in GENERATE_OPTIONS if command in o.commands]):
            f = schema_option(option)(f)
        return f
    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlxvid")
@click.option("--debug", is_flag=True, help="Print the traceback of an unexpected error (also MLXVID_DEBUG=1).")
def cli(debug):
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


def _per_family(field: str) -> str:
    """`Wan 2.2: UMT5-XXL encoder; HunyuanVideo: ...`: one fact of every family, for a help text."""
    from .families import FAMILIES

    return "; ".join(f"{f.title}: {getattr(f, field)}" for f in FAMILIES.values() if getattr(f, field))


def _convert_help() -> str:
    """`mlxvid convert --help`, listing the families and their official layouts (from the family packages)."""
    from .families import FAMILIES

    indent = "\n" + " " * 19
    official = [f"{f.title}: {f.official_layout}".replace("\n", indent) for f in FAMILIES.values() if f.official_layout]
    return (
        "Convert checkpoints into an MLX-native model folder DST.\n\n\b\n"
        "SRC is a folder in any of these layouts (the family and format are detected from its files and keys):\n"
        "  diffusers        model_index.json, transformer/ (transformer_2/), text_encoder/ (text_encoder_2/),\n"
        f"                   tokenizer/ (tokenizer_2/), vae/ -- {', '.join(f.title for f in FAMILIES.values())}\n"
        "  official         " + (";" + indent).join(official) + "\n"
        "  single files     ComfyUI diffusion model / text encoder / VAE / all-in-one files (fp16, bf16, fp8 scaled,\n"
        "                   plain fp8, comfy_quant nvfp4 / mxfp8 / int8) and GGUF files\n"
        "or one checkpoint file (taken as --transformer). Component options supply or replace parts; without SRC,\n"
        "--base names the model. DST receives safetensors shards and configs, written into DST.part and renamed at\n"
        "the end; re-running an interrupted conversion keeps the shards already written."
    )


@cli.command(help=_convert_help())
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
@click.option("--text-encoder", type=click.Path(path_type=Path), default=None,
              help="Text encoder file or folder (" + _per_family("text_encoders") + ").")
@click.option("--text-encoder-2", "text_encoder_2", type=click.Path(path_type=Path), default=None,
              help="The second text encoder file or folder, for the models that have one (--text-encoder says which: "
                   "\"as --text-encoder-2\").")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help="VAE file (official or ComfyUI) or diffusers vae/ folder.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (" + _per_family("tokenizer") + ") or its spiece.model / tokenizer.json.")
@click.option("--allow-unknown-keys", is_flag=True, help="Leave out tensors mlxvid does not know instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert(paths, dtype, quantize, group_size, base, transformer, transformer_2, text_encoder, text_encoder_2, vae,
            tokenizer, allow_unknown_keys, overwrite):
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
        if bar.total != total or bar.postfix != component:
            bar.total = total
            bar.set_postfix_str(component, refresh=False)
        bar.update(done - bar.n)  # drawn at most every mininterval (every few seconds without a terminal)

    try:
        convert_model(src, dst, dtype=dtype, overwrite=overwrite, progress=progress, log=click.echo, quantize=quantize,
                      group_size=int(group_size), base=base, components=components, tokenizer=tokenizer,
                      allow_unknown_keys=allow_unknown_keys)
    finally:
        bar.close()
    click.echo(f"wrote {dst}")


# What `download` fetches from a diffusers-layout repository when the family's converter names nothing else
# (`DOWNLOAD_PATTERNS` in the family's planner, mlx_video/families/<family>/planner.py).
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
    if spec.hf_repo is None:
        raise MlxVideoError(f"{spec.id} has no diffusers-layout repository to download; get its official release and "
                            f"run `mlxvid convert PATH DST --base {spec.id}`")
    dst = models_home() / spec.id
    if (dst / "mlxvid.json").is_file() and not overwrite:
        click.echo(f"{spec.id} is already converted at {dst} (--overwrite redoes it)")
        return
    try:
        from huggingface_hub import snapshot_download

        click.echo(f"fetching {spec.hf_repo} (only the pipeline's files) into the Hugging Face cache")
        from .families import converter

        planner = converter(spec.family)
        patterns = [*getattr(planner, "DOWNLOAD_PATTERNS", DIFFUSERS_FILES),
                    *getattr(planner, "EXTRA_DOWNLOAD_PATTERNS", {}).get(spec.id, [])]
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
@schema_options("generate")
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

from .server.command import serve_command  # noqa: E402  (fastapi and uvicorn are imported when it runs)

cli.add_command(serve_command)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--check", is_flag=True, help="Only check the manifest and say which jobs would run.")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the JSON summary. Default: MANIFEST.summary.json beside the manifest.")
@click.option("--outputs-anywhere", is_flag=True,
              help="Let the manifest's outputs be absolute paths or lead out of its folder (refused by default).")
def batch(manifest, check, summary, outputs_anywhere):
    """Run the jobs of a JSON (list) or JSON Lines MANIFEST; re-running it resumes.

    Each job's keys are generate's option names with _ for - (prompt, model, preset, quality, duration, seed,
    output, overlay, ...). Every job is checked before any model loads; jobs run grouped by model; a failed
    job does not stop the others; jobs whose output and sidecar already match are skipped. An output that
    exists and is not the job's own is never replaced unless the job says "overwrite": true; outputs stay in
    the manifest's folder (see --outputs-anywhere); one run at a time per manifest.
    """
    from .batch import run_batch

    jobs = run_batch(manifest, check_only=check, summary_path=summary, outputs_anywhere=outputs_anywhere)
    if any(j.status in ("invalid", "failed") for j in jobs):
        sys.exit(1)


@cli.command()
@click.argument("latents", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@schema_option(OPTIONS["output"], required=True, help="Video (.mp4/.mov) or PNG folder (a name with a dot ends in /).")
@schema_option(OPTIONS["model"], help="Model folder or id. Default: the one the latents' sidecar names.")
@schema_option(OPTIONS["preset"], help="Deliver in this preset instead of the recorded one.")
@schema_option(OPTIONS["overlay"], help="Overlays instead of the recorded ones.")
@click.option("--no-overlay", is_flag=True, help="Drop the recorded overlays.")
@schema_option(OPTIONS["watermark"], help="A watermark instead of the recorded one.")
@click.option("--no-watermark", is_flag=True, help="Drop the recorded watermark.")
@schema_option(OPTIONS["watermark_corner"], help="Corner of the watermark instead of the recorded one.")
@schema_option(OPTIONS["font"], help="A font file instead of the recorded one.")
@schema_option(OPTIONS["overwrite"])
@schema_option(OPTIONS["quiet"])
def decode(latents, output, model, preset, overlay, no_overlay, watermark, no_watermark, watermark_corner, font,
           overwrite, quiet):
    """Decode saved latents (a .npy from --save-latents, or kept after a failed write) into a video.

    The .json sidecar beside the latents supplies the model, frame rate, preset, overlays and watermark; the
    delivery options given here replace the recorded ones (--no-watermark, --no-overlay drop them).
    """
    from .run import decode_latents

    if (no_overlay and overlay) or (no_watermark and watermark is not None):
        raise MlxVideoError("give --overlay or --no-overlay, --watermark or --no-watermark, not both")
    delivery = {k: v for k, v in (("preset", preset), ("overlay", overlay or None), ("font", font),
                                  ("watermark", watermark), ("watermark_corner", watermark_corner)) if v is not None}
    if no_overlay:
        delivery["overlay"] = None
    if no_watermark:
        delivery.update(watermark=None, watermark_corner=None)
    decode_latents(latents, output, model=model, overwrite=overwrite, quiet=quiet, delivery=delivery)


@cli.command()
@click.argument("latents", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@schema_option(OPTIONS["output"], required=True, help="The upscaled latents (.npy, with a .json sidecar).")
@schema_option(OPTIONS["model"], help="The super-resolution model (folder or id). Default: the registry's one for the "
               "run's model (e.g. a 480p run to 720p).")
@schema_option(OPTIONS["seed"], default=None, show_default=False,
               help="Seed of the re-noising and the initial noise. Default: the run's.")
@schema_option(OPTIONS["overwrite"])
@schema_option(OPTIONS["quiet"])
def upscale(latents, output, model, seed, overwrite, quiet):
    """Upscale a finished run's latents (a .npy from --save-latents, with its sidecar) with a super-resolution model.

    The prompt is the run's, encoded by the run's model folder; decode the result with `mlxvid decode`.
    """
    from .upscale import upscale_latents

    upscale_latents(latents, output, model=model, seed=seed, overwrite=overwrite, quiet=quiet)


def main(argv=None) -> None:
    """The `mlxvid` command: our errors as one line; any other exception as one line with a hint (the traceback
    with --debug, or MLXVID_DEBUG=1); Ctrl-C as "interrupted", exit status 130, never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MLXVID_DEBUG") not in (None, "", "0")
    if "--debug" in args:
        args.remove("--debug")
    try:
        cli.main(args=args, prog_name="mlxvid", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _exit(130, "interrupted")
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MlxVideoError as e:
        _exit(1, f"error: {e}")
    except RuntimeError as e:
        if "[ring]" not in str(e) and "peer" not in str(e):
            _unexpected(e, debug)
        # mx.distributed: another process of the group stopped; outputs are written at the end, atomically
        _exit(1, f"error: another rank of the group stopped ({e}); this rank stops too and nothing was written")
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 -- the last line of defence: one line, not a traceback
        _unexpected(e, debug)


def _exit(code: int, message: str) -> None:
    try:
        click.echo(message, err=True)
    except (KeyboardInterrupt, OSError):
        pass
    sys.exit(code)


def _unexpected(error: BaseException, debug: bool) -> None:
    """An exception no check caught: one line naming it, with a hint; the traceback only when debugging."""
    if debug:
        import traceback

        traceback.print_exception(error)
    if isinstance(error, MemoryError):
        hint = "the run needs more memory than is free: try a smaller --size, fewer --frames or --max-memory"
    elif isinstance(error, OSError):
        hint = "a file could not be read or written"
    else:
        hint = "this is a bug in mlxvid; rerun with --debug for the traceback and report it"
    text = str(error).splitlines()[0][:300] if str(error) else ""
    _exit(1, f"error: {type(error).__name__}{': ' + text if text else ''} ({hint})")


if __name__ == "__main__":
    main()
