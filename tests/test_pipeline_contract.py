"""The pipeline contract (`mlx_video.pipelines.base.Pipeline`'s abstract methods), checked for every registered
family and task pipeline: each implements every abstract method with the base's parameters, and its `vae_tile`
returns the one `DecodeTiling` type, on a converted tiny folder of each family built without torch (the folder
needs only configs: nothing here reads weights)."""

from __future__ import annotations

import inspect
import json

import pytest

import mlx_video.families as families
from mlx_video.errors import MlxVideoError
from mlx_video.model_folder import FORMAT_VERSION, INDEX, MANIFEST, ModelFolder
from mlx_video.pipelines.base import DecodeTiling, Pipeline
from mlx_video.registry import MODELS

CONTRACT = sorted(name for name, value in vars(Pipeline).items()
                  if getattr(value, "__isabstractmethod__", False)
                  or getattr(getattr(value, "fget", None), "__isabstractmethod__", False))

PIPELINES = sorted({(spec.family, spec.task if spec.task in dict(families.get_family(spec.family).task_pipelines)
                     else None) for spec in MODELS.values()}, key=str)


def test_the_contract_is_the_declared_one():
    assert CONTRACT == ["decode", "encode", "estimate_memory", "latent_channels", "make_predict", "vae_tile"]


@pytest.mark.parametrize("family,task", PIPELINES)
def test_every_family_pipeline_fulfils_the_contract(family, task):
    cls = families.pipeline_class(family, task)
    assert issubclass(cls, Pipeline)
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves abstract: {sorted(cls.__abstractmethods__)}"
    for name in CONTRACT:
        ours, base = getattr(cls, name), getattr(Pipeline, name)
        if isinstance(base, property):
            assert isinstance(ours, property), name
            continue
        want = [p for p in inspect.signature(base).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        have = inspect.signature(ours).parameters
        for p in want:
            assert p.name in have, f"{cls.__name__}.{name} lacks the parameter {p.name}"
            assert have[p.name].default == p.default, f"{cls.__name__}.{name}({p.name}=...) differs from the base"
    assert "generate" in {n for k in cls.__mro__ for n in vars(k)}


def _folder(tmp_path, spec) -> ModelFolder:
    """A converted folder's manifest, transformer config (the published one) and a word-level tokenizer; no weights."""
    from dataclasses import asdict

    folder = tmp_path / spec.id
    folder.mkdir()
    manifest = {"format_version": FORMAT_VERSION, "model": spec.id, "family": spec.family, "dtype": "bfloat16",
                "components": ["audio_encoder"], "defaults": dict(spec.defaults)}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(["<unk>", "<pad>", "</s>", "<|end_of_text|>", "<|endoftext|>", "a"])}
    (folder / "tokenizer").mkdir()
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer" / "tokenizer.json"))
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps(asdict(spec.transformer)))
    # the voice encoder an audio-driven pipeline checks for when it opens (its config only)
    (folder / "audio_encoder").mkdir()
    (folder / "audio_encoder" / "config.json").write_text("{}")
    (folder / "audio_encoder" / INDEX).write_text(json.dumps({"weight_map": {}}))
    return ModelFolder.open(folder)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_vae_tile_returns_one_type_for_every_family(model_id, tmp_path):
    spec = MODELS[model_id]
    pipe = families.pipeline_class(spec.family, spec.task)(_folder(tmp_path, spec))
    for mode in ("on", "off"):
        tiling = pipe.vae_tile(mode, (8, 8), frames=spec.frames)
        assert isinstance(tiling, DecodeTiling)
        assert isinstance(tiling.spatial, bool) and isinstance(tiling.temporal, bool)
    with pytest.raises(MlxVideoError, match="--vae-tiling takes auto, on or off"):
        pipe.vae_tile("sometimes", (8, 8))
