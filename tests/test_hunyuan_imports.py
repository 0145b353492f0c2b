"""The runtime does not import transformers or torch: importing the HunyuanVideo pipeline, its Llama text-encoder
module and the CLI leaves both out of `sys.modules` (mlx_lm, whose package imports transformers, is imported only
when the Llama encoder is built). Checked in a fresh interpreter, since this test process has both loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHECK = """
import json, sys
import {module}
print(json.dumps({{name: name in sys.modules for name in ("transformers", "torch", "mlx_lm", "diffusers")}}))
"""


def _loaded_after(module: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHECK.format(module=module)], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["mlx_video.families.hunyuan.pipeline", "mlx_video.text_encoders.llama", "mlx_video.cli"])
def test_import_leaves_out_transformers_and_torch(module):
    loaded = _loaded_after(module)
    assert not loaded["transformers"] and not loaded["torch"] and not loaded["diffusers"], loaded
    assert not loaded["mlx_lm"], loaded


def test_the_check_sees_an_import():
    # the probe is not blind: building the encoder's arguments imports mlx_lm (and, through it, transformers)
    loaded = _loaded_after("mlx_video.text_encoders.llama; mlx_video.text_encoders.llama.llama_args("
                           "dict(hidden_size=8, num_hidden_layers=1, intermediate_size=8, num_attention_heads=2, "
                           "rms_norm_eps=1e-5, vocab_size=10))")
    assert loaded["mlx_lm"] and loaded["transformers"], loaded
