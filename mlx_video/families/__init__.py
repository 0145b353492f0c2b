"""The model families, and where each one's code lives.

The shared parts of the engine (the denoising loop, samplers, model folders, the converter's machinery,
memory preflight, outputs, CLI, benchmarks) know no family by name: they look the family up here, the way
mlx-lm picks a model class from a config's `model_type`, and import its modules only when used.

A family provides:
    pipeline   a class with `from_folder(ModelFolder)`; see `mlx_video.pipelines.base.Pipeline`
    task_pipelines  classes for tasks whose generation differs in kind (Wan S2V: a chain of audio-driven clips)
    converter  a module of `mlx_video.convert.families` with `detect(src)`, `plan(...)` and its signatures
    cost       a module with the FLOP and memory model used by the preflight and the benchmarks
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from mlx_video.errors import MlxVideoError


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    pipeline: str  # "module:Class"
    converter: str  # module path
    cost: str  # module path
    task_pipelines: tuple[tuple[str, str], ...] = ()  # (task, "module:Class") where a task needs its own pipeline
    text_encoders: str = ""  # what `convert --text-encoder` (and --text-encoder-2) take, for the help
    tokenizer: str = ""  # what `convert --tokenizer` takes, for the help


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("wan", "Wan 2.2", "mlx_video.families.wan.pipeline:WanPipeline", "mlx_video.families.wan.planner",
               "mlx_video.families.wan.cost_model", (("s2v", "mlx_video.families.wan.s2v_pipeline:WanS2VPipeline"),),
               "UMT5-XXL encoder", "google/umt5-xxl"),
        Family("hunyuan", "HunyuanVideo", "mlx_video.families.hunyuan.pipeline:HunyuanPipeline",
               "mlx_video.families.hunyuan.planner", "mlx_video.families.hunyuan.cost_model",
               text_encoders="LLaVA-LLaMA-3-8B, and CLIP-L as --text-encoder-2", tokenizer="the LLaMA tokenizer folder"),
        Family("mochi", "Mochi 1", "mlx_video.families.mochi.pipeline:MochiPipeline", "mlx_video.families.mochi.planner",
               "mlx_video.families.mochi.cost_model", text_encoders="T5-v1.1-XXL encoder", tokenizer="google/t5-v1_1-xxl"),
    ]
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise MlxVideoError(f"unknown model family {name!r}; this mlxvid knows {', '.join(FAMILIES)}") from None


def _load(path: str):
    module, _, attr = path.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded


def pipeline_class(name: str, task: str | None = None):
    family = get_family(name)
    return _load(dict(family.task_pipelines).get(task, family.pipeline))


def converter(name: str):
    return _load(get_family(name).converter)


def cost_model(name: str):
    return _load(get_family(name).cost)
