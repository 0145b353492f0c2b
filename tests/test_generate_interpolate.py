"""`mlxvid generate --interpolate 2x|4x`: RIFE 4.25 after decoding, before delivery.

The generator is the tiny random A14B-style Wan model of conftest.py; the RIFE weights are a converted folder
of our full-size IFNet with random weights (as tests/test_rife.py's `mlx_weights`). Frame counts and rates are
read back with PyAV; the frames themselves are compared, losslessly through PNG folders, with a run without
interpolation and with `mlxvid interpolate` applied to that run's frames.
"""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
from PIL import Image

from mlx_video.cli import main
from mlx_video.errors import MlxVideoError
from mlx_video.presets import get_preset, retime_indices
from support.cli import run_error

pytest.importorskip("torch")
pytest.importorskip("diffusers")

SIZE, FRAMES, FPS = "48x32", 5, 16  # 5 frames: 2 latent frames; the tiny A14B's default rate is 16


@pytest.fixture(scope="module")
def rife_folder(tmp_path_factory):
    """A converted RIFE 4.25 folder holding random weights of our IFNet."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_video.rife.weights import CONFIG, WEIGHTS
    from mlx_video.rife import IFNet

    mx.random.seed(11)
    model = IFNet()
    folder = tmp_path_factory.mktemp("rife_generate") / "rife"
    folder.mkdir()
    mx.save_safetensors(str(folder / WEIGHTS), dict(tree_flatten(model.parameters())))
    (folder / CONFIG).write_text(json.dumps({"family": "rife", "format_version": 1, **model.config.to_dict()}))
    return folder


def gen(model, *extra):
    return ["generate", "--model", str(model), "--prompt", "a fox in the snow", "--size", SIZE, "--frames",
            str(FRAMES), "--steps", "1", "--seed", "3", "--quiet", *extra]


def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, float(stream.average_rate)


def read_pngs(folder):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def sidecar(path):
    return json.loads(path.with_suffix(".json").read_text())["settings"]


@pytest.fixture
def weights_forbidden(monkeypatch):
    """Fail the test if the generator's or RIFE's weights are read."""
    from mlx_video import model_folder
    from mlx_video.rife import weights as rife

    def boom(*a, **k):
        raise AssertionError("weights were read before the options were checked")

    monkeypatch.setattr(model_folder.ModelFolder, "weights", boom)
    monkeypatch.setattr(rife, "load_rife", boom)
    monkeypatch.setattr(rife, "convert_flownet", boom)


def test_2x_doubles_frames_and_rate_and_keeps_the_decoded_frames(a14b, rife_folder, tmp_path):
    root, _ = a14b
    plain, smooth = tmp_path / "plain", tmp_path / "smooth"
    main(gen(root / "mlx", "--output", str(plain)))
    main(gen(root / "mlx", "--output", str(smooth), "--interpolate", "2x", "--rife-weights", str(rife_folder)))
    decoded, frames = read_pngs(plain), read_pngs(smooth)
    assert decoded.shape[0] == FRAMES and frames.shape == (2 * (FRAMES - 1) + 1, *decoded.shape[1:])
    np.testing.assert_array_equal(frames[::2], decoded)  # the decoded frames stay, untouched
    assert not np.array_equal(frames[1], decoded[0]) and not np.array_equal(frames[1], decoded[1])

    # the in-between frames are those of `mlxvid interpolate` run on the plain run's frames
    separate = tmp_path / "separate"
    main(["interpolate", str(plain), str(separate), "--factor", "2", "--rife-weights", str(rife_folder)])
    np.testing.assert_array_equal(frames, read_pngs(separate))

    record = sidecar(smooth)
    info = record["interpolate"]
    assert info["factor"] == 2 and info["scale"] == 1.0 and info["weights"] == str(rife_folder)
    assert (info["frames_before"], info["frames_after"]) == (FRAMES, 2 * (FRAMES - 1) + 1)
    assert (info["fps_before"], info["fps_after"]) == (FPS, 2 * FPS)
    assert isinstance(info["scene_cuts"], list)
    assert record["output_frames"] == 2 * (FRAMES - 1) + 1 and record["output_fps"] == 2 * FPS
    assert record["options"]["interpolate"] == "2x"


def test_2x_mp4_is_written_at_twice_the_rate(a14b, rife_folder, tmp_path):
    root, _ = a14b
    out = tmp_path / "fox.mp4"
    main(gen(root / "mlx", "--output", str(out), "--interpolate", "2x", "--rife-weights", str(rife_folder)))
    frames, rate = read_video(out)
    assert len(frames) == 2 * (FRAMES - 1) + 1 and rate == 2 * FPS
    assert frames[0].shape == (32, 48, 3)
    assert sidecar(out)["interpolate"]["frames_after"] == len(frames)


def test_4x_with_an_overlay_from_the_models_home(a14b, rife_folder, tmp_path, monkeypatch):
    """Streamed through a delivery step (an overlay), and the default weights, $MLXVID_HOME/models/rife."""
    root, _ = a14b
    home = tmp_path / "home"
    shutil.copytree(rife_folder, home / "models" / "rife")
    monkeypatch.setenv("MLXVID_HOME", str(home))
    out = tmp_path / "fox4.mp4"
    main(gen(root / "mlx", "--output", str(out), "--interpolate", "4X", "--overlay", "Hello"))
    frames, rate = read_video(out)
    assert len(frames) == 4 * (FRAMES - 1) + 1 and rate == 4 * FPS
    record = sidecar(out)
    assert record["interpolate"]["weights"] == str(home / "models" / "rife")
    assert record["interpolate"]["factor"] == 4 and record["interpolate"]["frames_after"] == len(frames)
    assert record["delivery"]["render_fps"] == 4 * FPS
    assert record["delivery"]["frame_rate_conversion"] == "none"


def test_2x_then_a_presets_rate_by_nearest_frame(a14b, rife_folder, tmp_path):
    root, _ = a14b
    preset = get_preset("linkedin-square")
    out = tmp_path / "square.mp4"
    main(gen(root / "mlx", "--output", str(out), "--interpolate", "2x", "--rife-weights", str(rife_folder),
             "--preset", preset.name))
    frames, rate = read_video(out)
    interpolated = 2 * (FRAMES - 1) + 1
    assert rate == preset.fps
    assert len(frames) == len(retime_indices(interpolated, 2 * FPS, preset.fps)) != interpolated
    assert frames[0].shape == (preset.height, preset.width, 3)
    record = sidecar(out)
    assert record["interpolate"]["frames_after"] == interpolated
    assert record["delivery"]["render_fps"] == 2 * FPS
    assert record["delivery"]["frame_rate_conversion"] == "nearest frame in time"
    assert record["output_fps"] == preset.fps and record["output_frames"] == len(frames)


@pytest.mark.parametrize("extra, needle", [
    (["--rife-weights", "{missing}"], "RIFE weights not found at"),
    ([], "RIFE weights not found at"),  # nothing in $MLXVID_HOME/models/rife
    (["--rife-weights", "{empty}"], "holds no RIFE weights"),
])
def test_refusals_before_any_weights_are_read(a14b, rife_folder, tmp_path, capsys, monkeypatch, weights_forbidden,
                                              extra, needle):
    root, _ = a14b
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path / "home"))
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope.pkl", "empty": tmp_path / "empty", "rife": rife_folder}
    extra = [e.format(**paths) for e in extra]
    out = tmp_path / "v.mp4"
    args = gen(root / "mlx", "--output", str(out), "--interpolate", "2x")
    if "--frames" in extra:  # replaces the one-clip frame count
        i = args.index("--frames")
        del args[i:i + 2]
    err = run_error(capsys, args + extra)
    assert needle in err
    assert not out.exists()


def test_option_refusals(a14b, rife_folder, tmp_path, capsys, weights_forbidden):
    root, _ = a14b
    out = tmp_path / "v.mp4"
    err = run_error(capsys, gen(root / "mlx", "--output", str(out), "--interpolate", "3x", "--rife-weights",
                                str(rife_folder)))
    assert "--interpolate must be 2x or 4x, not '3x'" in err
    err = run_error(capsys, gen(root / "mlx", "--output", str(out), "--rife-weights", str(rife_folder)))
    assert "--rife-weights is for --interpolate" in err
    err = run_error(capsys, gen(root / "mlx", "--save-latents", str(tmp_path / "z.npy"), "--interpolate", "2x",
                                "--rife-weights", str(rife_folder)))
    assert "give --output" in err
    assert not out.exists() and not (tmp_path / "z.npy").exists()


@pytest.mark.parametrize("value", ["3x", 3, 8, "2", True, "x2"])
def test_api_and_manifest_factors_are_checked(a14b, rife_folder, tmp_path, weights_forbidden, value):
    from mlx_video.run import prepare

    root, _ = a14b
    options = {"model": str(root / "mlx"), "prompt": "a fox", "size": SIZE, "frames": FRAMES, "steps": 1,
               "output": str(tmp_path / "v.mp4"), "interpolate": value, "rife_weights": str(rife_folder)}
    with pytest.raises(MlxVideoError, match="--interpolate must be 2x or 4x"):
        prepare(options)
    job = prepare({**options, "interpolate": 4})  # a manifest may give the number
    assert job.interpolation.factor == 4 and job.frame_rate == 4 * FPS


def test_decode_of_saved_latents_interpolates_as_the_run_did(a14b, rife_folder, tmp_path):
    root, _ = a14b
    latents, out = tmp_path / "z.npy", tmp_path / "v.mp4"
    main(gen(root / "mlx", "--output", str(out), "--save-latents", str(latents), "--interpolate", "2x",
             "--rife-weights", str(rife_folder)))
    decoded = tmp_path / "d.mp4"
    main(["decode", str(latents), "--output", str(decoded), "--quiet"])
    frames, rate = read_video(decoded)
    assert len(frames) == 2 * (FRAMES - 1) + 1 and rate == 2 * FPS
    assert sidecar(decoded)["interpolate"]["frames_after"] == len(frames)


def test_a_chain_is_interpolated_and_delivered_as_it_is_made(a14b, rife_folder, tmp_path):
    """A chain of clips with --interpolate 2x and an overlay, streamed: the frames of `mlxvid interpolate` run on
    the undelivered chain, with the one-clip delivery applied after."""
    from mlx_video.overlay import parse_overlay
    from mlx_video.run import Delivery

    root, _ = a14b
    chain = ["generate", "--model", str(root / "mlx"), "--prompt", "a fox in the snow", "--size", SIZE, "--fps", "4",
             "--frames", "20", "--segment-frames", "13", "--steps", "1", "--seed", "3", "--quiet"]
    plain, smooth = tmp_path / "plain", tmp_path / "smooth"
    main(chain + ["--output", str(plain)])
    main(chain + ["--output", str(smooth), "--interpolate", "2x", "--rife-weights", str(rife_folder),
                  "--overlay", "Hi@1-3"])
    separate = tmp_path / "separate"
    main(["interpolate", str(plain), str(separate), "--factor", "2", "--rife-weights", str(rife_folder)])
    interpolated = read_pngs(separate)
    assert read_pngs(plain).shape[0] == 20 and interpolated.shape[0] == 39
    want = Delivery(48, 32, 8, None, "crop", None, [parse_overlay("Hi@1-3")]).apply(interpolated, 8)
    np.testing.assert_array_equal(read_pngs(smooth), want)
    record = sidecar(smooth)
    assert record["extension"]["segments"] == 2 and record["output_frames"] == 39 and record["output_fps"] == 8
    assert (record["interpolate"]["frames_before"], record["interpolate"]["frames_after"]) == (20, 39)
