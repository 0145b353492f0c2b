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
