import pytest


@pytest.fixture(scope="session")
def a14b(tmp_path_factory):
    """A tiny random A14B-style diffusers pipeline, saved, and converted to fp32 with `mlxvid convert`."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from support.wan import build_tiny_wan_pipeline

    from mlx_video.cli import main

    root = tmp_path_factory.mktemp("a14b")
    pipe = build_tiny_wan_pipeline(root / "diffusers", two_experts=True, shift=12.0)
    main(["convert", str(root / "diffusers"), str(root / "mlx"), "--dtype", "fp32"])
    return root, pipe


# Fixtures that several test modules take by name (a module's own fixture of the same name wins over these).
@pytest.fixture
def heavy_work_forbidden(monkeypatch):
    """Fail the test if any weights are loaded: the errors must come before."""
    from mlx_video import model_folder

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the input was validated")

    monkeypatch.setattr(model_folder.ModelFolder, "weights", boom)


@pytest.fixture
def no_denoising(monkeypatch):
    """Fail the test if any denoising step starts."""
    import mlx_video.pipelines.base as base  # every family's loop runs through Pipeline.run_denoising

    def refuse(*a, **k):
        raise AssertionError("a denoising step ran")

    monkeypatch.setattr(base, "denoise", refuse)


@pytest.fixture
def tiny_registry(monkeypatch):
    """Registry entries with the tiny Wan model's dimensions, so that `--base` can name them."""
    from mlx_video.registry import MODELS
    from support.wan_checkpoints import tiny_specs

    for name, spec in tiny_specs().items():
        monkeypatch.setitem(MODELS, name, spec)


@pytest.fixture
def one_torch_thread():
    """The references run tiny tensors: on a shared 2-core machine more torch threads make them ~10x slower.
    Modules take it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
