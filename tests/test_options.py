"""The typed option schema (mlx_video.options): one table, one validator, the same words from the command line,
a batch manifest and a request body; and the bounds every option gets (issue 24, item 12)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from mlx_video.errors import MlxVideoError
from mlx_video.options import (GENERATE_OPTIONS, MAX_MANIFEST_LINE_BYTES, MAX_OVERLAY_CHARS, MAX_PROMPT_CHARS,
                               MAX_STEPS, NOT_RECORDED, OPTIONS, recorded_options, validate)


def cli_error(capsys, args) -> str:
    from mlx_video.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err[len("error: "):].strip()


BAD = [  # (option, a bad value as a request body would send it, the same as the command line writes it)
    ("frames", "abc", "abc"),
    ("frames", 0, "0"),
    ("frames", 1_000_000_000, "1000000000"),
    ("steps", 10_000_000, "10000000"),
    ("steps", 2.5, "2.5"),
    ("seed", -1, "-1"),
    ("guidance", "nan", "nan"),
    ("shift", -1, "-1"),
    ("fps", 0, "0"),
    ("duration", 1e9, "1e9"),
    ("sampler", "heun", "heun"),
    ("quality", "ultra", "ultra"),
    ("size", "48", "48"),
    ("sigmas", "1,x", "1,x"),
    ("interpolate", "3x", "3x"),
    ("prompt", "p" * (MAX_PROMPT_CHARS + 1), "p" * (MAX_PROMPT_CHARS + 1)),
    ("overlay", ["o" * (MAX_OVERLAY_CHARS + 1)], "o" * (MAX_OVERLAY_CHARS + 1)),
    ("segment_prompt", [" "], " "),
]


@pytest.mark.parametrize("name,value,text", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_a_request_body_gets_the_command_lines_words(capsys, name, value, text):
    """A job server validates a JSON body with `validate` alone and answers with the CLI's message."""
    body = json.loads(json.dumps({"model": "some-model", "prompt": "a cat", name: value}))
    with pytest.raises(MlxVideoError) as exc:
        validate(body)
    flag = "--" + name.replace("_", "-")
    args = ["generate", "--model", "some-model", "--save-latents", "x.npy", flag, text]
    if name != "prompt":
        args += ["--prompt", "a cat"]
    assert str(exc.value) == cli_error(capsys, args)
    assert str(exc.value).startswith(flag) or "segment prompt" in str(exc.value)


def test_validating_imports_no_command_line_library():
    code = ("import sys\nfrom mlx_video.options import validate\n"
            "o = validate({'model': 'm', 'prompt': 'p', 'frames': '81', 'overlay': 'hi@0-1', 'steps': 4})\n"
            "assert o['frames'] == 81 and o['overlay'] == ('hi@0-1',) and o['steps'] == 4, o\n"
            "assert 'click' not in sys.modules, 'click was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validate_converts_and_names_every_problem_at_once():
    o = validate({"model": "m", "prompt": "p", "size": "48X32", "guidance": "3.5", "lora": "a.safetensors:0.5",
                  "segment_prompt": "then a dog@2", "interpolate": 2, "overwrite": True})
    assert o["size"] == "48x32" and o["guidance"] == 3.5 and o["lora"] == ("a.safetensors:0.5",)
    assert o["segment_prompt"] == ({"prompt": "then a dog", "at": 2.0, "seed": None},) and o["interpolate"] == "2x"
    assert validate(o) == o  # converting a converted dict changes nothing (the CLI converts, then prepare does)
    with pytest.raises(MlxVideoError) as exc:
        validate({"prompt": "", "stepz": 3, "frames": "x", "guidance-2": 1}, all_problems=True)
    message = str(exc.value)
    for part in ("unknown key 'stepz'", "unknown key 'guidance-2' (did you mean guidance_2?)",
                 "--frames takes a whole number, not 'x'", "--model is required", "--prompt is required"):
        assert part in message
    with pytest.raises(MlxVideoError, match="JSON object"):
        validate(["not", "a", "dict"])


def test_the_command_line_batch_and_sidecar_come_from_the_schema():
    from mlx_video import batch
    from mlx_video.cli import decode, generate

    assert {p.name for p in generate.params} == set(OPTIONS)
    # decode's own: the latents, and the two flags that drop a recorded delivery input
    own = {"latents", "no_overlay", "no_watermark"}
    assert {p.name for p in decode.params} - own == {o.name for o in GENERATE_OPTIONS if "decode" in o.commands}
    assert set(batch.PATH_KEYS) == {o.name for o in GENERATE_OPTIONS if o.kind in ("path", "output")}
    assert NOT_RECORDED == {"quiet", "overwrite", "preview_every", "from_sidecar"}
    record = recorded_options(validate({"model": "m", "prompt": "p", "quiet": True, "seed": 3, "overlay": []}))
    assert record == {"model": "m", "prompt": "p", "seed": 3}


def test_help_texts_come_from_the_registry():
    from mlx_video.registry import MODELS

    frames_help = OPTIONS["frames"].help_text()
    for spec in MODELS.values():
        assert f"{spec.default('frames')} (" in frames_help and spec.id in frames_help
    assert "6n+1" in frames_help and "4n+1" in frames_help
    from mlx_video.cli import convert
    from mlx_video.families import FAMILIES

    encoder_help = next(p.help for p in convert.params if p.name == "text_encoder")
    for family in FAMILIES.values():
        assert f"{family.title}: {family.text_encoders}" in encoder_help
    # --attention: each family's default dense steps and blocks; --cache: the models with a schedule of their own
    from mlx_video.speedup import radial_parameters

    attention_help, cache_help = OPTIONS["attention"].help_text(), OPTIONS["cache"].help_text()
    for spec in MODELS.values():
        radial = radial_parameters(spec)[0]
        if radial is not None:
            title = FAMILIES[spec.family].title
            assert re.search(rf"{re.escape(title)}(, ours)?: [0-9 or]*\b{radial.dense_steps}\b", attention_help), spec.id
        own_schedule = cache_help.partition("starts from it (")[2].partition(")")[0].split(", ")
        assert (spec.id in own_schedule) == bool(spec.extra.get("cache_settings", {}).get("taylorseer")), spec.id


# ---- bounds (issue 24, item 12): each refused at once, naming the limit ----

def quick_error(capsys, args) -> str:
    start = time.perf_counter()
    err = cli_error(capsys, args)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"refused in {seconds:.2f} s: {err[:100]}")
    assert seconds < 30  # a hang guard only: the refusal comes before any work
    return err


def test_frames_beyond_an_hour_at_the_models_fps_are_refused(a14b, capsys, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    base = ["generate", "--model", str(root / "mlx"), "--prompt", "a cat", "--output", str(tmp_path / "v.mp4")]
    err = quick_error(capsys, base + ["--frames", "1000000000"])
    assert err == "--frames must be a whole number from 1 to 432000 (3600 s at 120 fps), got 1000000000"
    err = quick_error(capsys, base + ["--frames", "57601"])  # the tiny model's fps is 16: an hour is 57600 frames
    assert "--frames 57601 is longer than a chain of clips may be: at most 3600 s, 57600 frames" in err
    assert "16 fps" in err
    err = quick_error(capsys, base + ["--duration", "3601"])
    assert err.startswith("--duration must be at most 3600")


def test_steps_are_bounded_for_the_api_too(a14b):
    from mlx_video.pipelines.base import GenerationSettings, Pipeline

    root, _ = a14b
    pipe = Pipeline.from_pretrained(str(root / "mlx"))
    with pytest.raises(MlxVideoError, match=f"--steps must be a whole number from 1 to {MAX_STEPS}"):
        pipe.resolve(GenerationSettings(prompt="p", width=48, height=32, frames=5, steps=10_000_000))
    with pytest.raises(MlxVideoError, match="--sigmas takes at most 1000 values"):
        validate({"model": "m", "prompt": "p", "sigmas": [0.5] * (MAX_STEPS + 1)})


def test_a_prompt_past_the_text_length_is_refused_naming_it(a14b, capsys, heavy_work_forbidden, tmp_path):
    root, _ = a14b
    base = ["generate", "--model", str(root / "mlx"), "--size", "48x32", "--frames", "5",
            "--save-latents", str(tmp_path / "x.npy")]
    long = " ".join(["cat"] * 600)
    err = quick_error(capsys, base + ["--prompt", long])
    assert "the prompt is longer than the 511 tokens (plus the closing one) the text encoder" in err
    err = quick_error(capsys, base + ["--prompt", "cat", "--negative-prompt", long])
    assert err.startswith("the negative prompt is longer than the 511 tokens")
    err = quick_error(capsys, base + ["--prompt", "x" * 50_000_000])
    assert err == f"--prompt is 50000000 characters long, more than the {MAX_PROMPT_CHARS} it takes"
    assert not (tmp_path / "x.npy").exists()


def test_a_manifest_entry_past_the_line_limit_is_refused(tmp_path):
    from mlx_video.batch import read_manifest

    manifest = tmp_path / "m.jsonl"
    big = json.dumps({"model": "m", "prompt": "x" * MAX_MANIFEST_LINE_BYTES})
    manifest.write_text(json.dumps({"model": "m", "prompt": "ok"}) + "\n" + big + "\n")
    with pytest.raises(MlxVideoError, match=f"line 2: a job of {len(big)} bytes, more than the "
                                            f"{MAX_MANIFEST_LINE_BYTES} bytes"):
        read_manifest(manifest)
    listed = tmp_path / "m.json"
    listed.write_text("[\n" + json.dumps({"model": "m", "prompt": "ok"}) + ",\n" + big + "\n]\n")
    with pytest.raises(MlxVideoError, match="line 3: a job of"):
        read_manifest(listed)


def test_every_setting_comes_from_an_option():
    """A pipeline setting is an option of the same name (or its `setting`), or derived from options by
    run._settings; a new one-to-one option needs only its Option entry and its GenerationSettings field."""
    from dataclasses import fields

    from mlx_video.pipelines.base import GenerationSettings
    from mlx_video.run import settings_from_options

    names = {f.name for f in fields(GenerationSettings)}
    assert names - {o.setting or o.name for o in GENERATE_OPTIONS} == {"width", "height", "loras"}
    settings = settings_from_options(validate({"model": "m", "prompt": "p", "start_from_portrait": True,
                                               "image": "face.png", "guidance": 3}))
    assert settings["start_from_image"] is True and settings["image"] == "face.png" and settings["guidance"] == 3.0
    assert settings["seed"] == 0 and settings["guidance_mode"] == "batched"


def test_a_familys_name_for_a_shared_schedule_is_taken_and_recorded_as_the_shared_one():
    """--schedule takes a family's published name for a shared sigma schedule (Wan's `wan`, which sidecars written
    before the schedule was shared hold) and settles it to the shared schedule's name, the same grid."""
    import numpy as np

    from mlx_video.families import FAMILIES, schedule_names
    from mlx_video.samplers import SAMPLERS, SCHEDULES, make_sampler, make_schedule

    required = {"model": "m", "prompt": "p"}
    names = schedule_names()
    assert names and set(names.values()) <= set(SCHEDULES) and not set(names) & set(SCHEDULES)
    assert set(names) == {n for f in FAMILIES.values() for n, _ in f.schedule_names}
    for name, schedule in names.items():
        assert validate({**required, "schedule": name})["schedule"] == schedule
        assert f"{name}: {schedule}" in OPTIONS["schedule"].help_text()
    assert validate({**required, "schedule": "shifted-linear"})["schedule"] == "shifted-linear"
    with pytest.raises(MlxVideoError, match="--schedule must be one of"):
        validate({**required, "schedule": "Wan"})
    # the unipc step rule's own schedule is the shared UniPC grid, the official Wan 2.2 timesteps (integers)
    assert SAMPLERS["unipc"][1] == "unipc-grid"
    grid = make_schedule("unipc-grid", 4, 5.0)
    np.testing.assert_array_equal(make_sampler("unipc", 4, 5.0).timesteps, grid.timesteps)
    assert grid.timesteps.dtype == np.int64 and grid.timesteps[0] == 999
