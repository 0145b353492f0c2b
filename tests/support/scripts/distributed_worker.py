"""Run one generation on the process group mlx.launch made (used by test_distributed.py)."""

import json
import sys

import numpy as np

from mlx_video import distributed
from mlx_video.pipelines.base import GenerationSettings, Pipeline

if sys.argv[1] == "--die-on-rank-1":
    # rank 1 fails before the run starts; rank 0 runs the CLI and must stop with a message, writing nothing
    if distributed.rank() == 1:
        sys.exit("rank 1: simulated failure")
    from mlx_video.cli import main

    main(sys.argv[2:])
    sys.exit(0)

if sys.argv[1] == "--folder-per-rank":
    # each rank names its own model folder (as separate machines would): the run must refuse a mismatch
    folders = sys.argv[2].split(",")
    from mlx_video.cli import main

    main(["generate", "--model", folders[distributed.rank()], *sys.argv[3:]])
    sys.exit(0)

model, init, out, guidance, guidance_2, steps = sys.argv[1:7]
pipe = Pipeline.from_pretrained(model)
settings = GenerationSettings("a corgi surfs a wave at sunset", negative_prompt="static, blurry", width=48, height=32,
                              frames=9, steps=int(steps), guidance=float(guidance), guidance_2=float(guidance_2),
                              shift=12.0)
result = pipe.generate(settings, init_latents=np.load(init))
if distributed.rank() == 0:
    np.save(out, result.latents)
    with open(out + ".json", "w") as f:
        json.dump(result.parallel, f)
