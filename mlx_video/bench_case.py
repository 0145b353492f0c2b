"""What a family gives the benchmarks (benchmarks/harness.py, gpu_stages.py): the MLX side of one denoising step,
of one VAE decode and, for the runs against a reference implementation, data about that reference.

A family that has benchmark cases names a module on its `Family` (`bench="bench"`); that module defines

    DEPTH                       {depth kind: default blocks built}, e.g. {"layers": 2}; the first kind is what a
                                bare `--layers N` sets (with step_case)
    VARIANTS                    {model id: (variant names, the first the default)} for models with more than one
                                step case (optional)
    step_case(spec, size, frames, depth, dtype, width=None, seed=0, variant=None, guidance=True) -> StepCase
                                (optional, with DEPTH)
    vae_case(spec, dtype="fp32", width=None, chunk=None, seed=0) -> VAECase   (optional)
    vae_reference_case(kwargs, size, latent_frames, seed=0) -> VAEReferenceCase  (optional)
    GPU_CHECK                   {"real" | "dry": {"step" | "vae" | "radial": settings}}: the family's cases in
                                benchmarks/gpu_check.py at the GPU's sizes and at the CPU dry run's (optional)

`width` is a dict of the family's own width overrides (tests and dry runs use tiny ones). The runtime never
imports torch: a `ReferenceCase` holds the reference's class name and keyword arguments, our conversion of its
state dict and the inputs as numpy arrays; benchmarks/harness.py instantiates it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


def materialise(module: nn.Module, dtype: str) -> int:
    """Cast every floating parameter of `module` to `dtype` and evaluate them one at a time (a random init of one
    tensor at a time, never of the whole model). Returns the bytes of the parameters."""
    from mlx.utils import tree_flatten, tree_unflatten

    dt = DTYPES[dtype]
    params = tree_flatten(module.parameters())
    module.update(tree_unflatten([(k, v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in params]))
    total = 0
    for _, v in tree_flatten(module.parameters()):
        mx.eval(v)
        total += v.nbytes
    return total


def as_mx(inputs: dict[str, np.ndarray], dtype: str, keep: tuple[str, ...] = ()) -> dict[str, mx.array]:
    """numpy inputs as MLX arrays, the floating ones cast to `dtype` (those named in `keep` stay float32)."""
    out = {}
    for name, value in inputs.items():
        array = mx.array(value)
        if mx.issubdtype(array.dtype, mx.floating) and name not in keep:
            array = array.astype(DTYPES[dtype])
        out[name] = array
    return out



@contextmanager
def blocks_replaced(model: nn.Module, attribute: str, stub: Callable):
    """A `without_blocks` context: `model.<attribute>` (its list of blocks) is `[stub]` inside. The stub consumes
    the blocks' inputs at the cost of a slice: without any block, MLX's lazy evaluation would drop the embeddings
    that nothing else consumes, and the step without blocks would time less than it should."""
    blocks = getattr(model, attribute)
    setattr(model, attribute, [stub])
    try:
        yield
    finally:
        setattr(model, attribute, blocks)


@dataclass
class ReferenceCase:
    """The reference implementation of a step, as data: `class_name(**kwargs)` of `package` (diffusers) with its
    random init, cast to the run's dtype (its `_keep_in_fp32_modules` kept float32 where `keep_fp32_modules`),
    called as `model(*inputs[args], **{k: inputs[k] for k in keywords}, return_dict=False)[0]` on `inputs`
    (numpy, the reference's layout; floating ones cast unless named in `uncast`). With `guidance`, its output
    is (conditional, unconditional) along the batch, combined as uncond + guidance (cond - uncond).
    `convert` turns its state dict (as MLX arrays) into our weights. `flops`, where given: the family cost
    model's FLOPs of the reference's forward where it computes more than ours (padding that ours drops); None:
    the step's."""

    class_name: str
    kwargs: dict
    convert: Callable[[dict[str, mx.array]], list[tuple[str, mx.array]]]
    inputs: dict[str, np.ndarray]
    args: tuple[str, ...]
    keywords: tuple[str, ...] = ()
    uncast: tuple[str, ...] = ()
    guidance: float | None = None
    keep_fp32_modules: bool = False
    package: str = "diffusers"
    flops: float | None = None


@dataclass
class StepCase:
    """One denoising step of a reduced-depth transformer at the real width, MLX side.

    `model(dtype)` builds it with MLX's random init (not yet evaluated); `forward(model, inputs)` is the step as
    the pipeline runs it (guidance included) on `inputs` (numpy; `as_mx` casts them, `uncast` kept float32).
    `flops` / `full_flops`: the family cost model's FLOPs of the step at this depth / the release's depth.
    `without_blocks(model)`, where given, is a context in which the model runs with its blocks removed but their
    inputs still computed (time without blocks); `weights_bytes(dtype, blocks)`, where given, the cost model's
    bytes of the transformer with `blocks` blocks; `activation_estimate(dtype, fused_attention)` its estimate
    of the step's activations; `prepared_forward(model, inputs)`, where given, does once what the pipeline does
    once per video (the text context) and returns the step as a function of the inputs."""

    model_id: str
    config: Any
    depth: dict[str, int]
    full_depth: dict[str, int]
    tokens: int
    batch: int
    text_tokens: int
    model: Callable[[str], nn.Module]
    forward: Callable[[nn.Module, dict[str, mx.array]], mx.array]
    inputs: dict[str, np.ndarray]
    flops: int
    full_flops: int
    width: int
    uncast: tuple[str, ...] = ()
    variant: str | None = None
    without_blocks: Callable[[nn.Module], AbstractContextManager] | None = None
    weights_bytes: Callable[[str, int], int] | None = None
    activation_estimate: Callable[[str, bool], dict] | None = None
    prepared_forward: Callable[[nn.Module, dict[str, mx.array]], Callable[[dict[str, mx.array]], mx.array]] | None = None
    reference: ReferenceCase | None = None
    info: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return sum(self.depth.values())

    @property
    def full_layers(self) -> int:
        return sum(self.full_depth.values())


@dataclass
class VAECase:
    """A VAE at its real widths (or `width`'s), MLX's random init: `load(dtype, part)` evaluates the weights of
    its "decoder" (or "encoder") and returns their bytes; `decode(z)` decodes latents (B, T, h, w,
    latent_channels) as the pipeline does, copying the frames out, and returns the frame count;
    `estimate(width, height, frames)` is the pipeline's estimate of the decode's activation bytes (an int, or a
    dict by part with a "total"). `encode(video)` / `encode_estimate`, where given, the same for the encoder."""

    description: str
    config: dict
    spatial: int
    temporal: int
    latent_channels: int
    load: Callable[[str, str], int]
    decode: Callable[[mx.array], int]
    estimate: Callable[[int, int, int], Any]
    encode: Callable[[mx.array], Any] | None = None
    encode_estimate: Callable[[int, int, int], Any] | None = None


@dataclass
class VAEReferenceCase:
    """A VAE decode through ours and through the reference, as data: `class_name(**kwargs)` of `package`, its
    random init, fp32; `ours(reference_config, weights)` our decode (a callable returning the video, channels
    last) of `latents(reference_config)` (numpy, ours channels-last) from the reference's full config and its
    converted state dict (`convert`); `reference_latents(reference_config)` the same latents in the reference's
    layout and scale."""

    class_name: str
    kwargs: dict
    convert: Callable[[dict[str, mx.array]], list[tuple[str, mx.array]]]
    ours: Callable[[dict, list[tuple[str, mx.array]]], Callable[[], mx.array]]
    latents: Callable[[dict], np.ndarray]
    reference_latents: Callable[[dict], np.ndarray]
    package: str = "diffusers"
