"""Qwen2.5-VL-7B-Instruct's language model as a prompt encoder (its vision tower is never built), run with
mlx_lm's Qwen2 layers.

Usage (a converted `text_encoder/` with its `config.json`, and the released `tokenizer.json` beside a
`tokenizer_config.json` naming the pad token):

    encoder = Qwen25VLTextEncoder(folder.config("text_encoder"))
    folder.load_module("text_encoder", encoder)
    tokenizer = qwen_tokenizer(folder.path / "tokenizer")
    states, mask = encode_prompts(encoder, tokenizer, ["A cat walks on the grass."])
    # states (B, 1000, 3584) float32, mask (B, 1000) int32

What it does, as diffusers 0.42.1's `HunyuanVideo15Pipeline._get_mllm_prompt_embeds` does: each prompt (an empty
one becomes " ") goes into Qwen's chat template as the user turn after a fixed system message, with the
assistant's generation prompt appended; the text is tokenized to `crop_start + text_tokens` tokens (right
padding with `<|endoftext|>`), the language model runs with the padding keys masked, and the hidden state
`hidden_states[-(2 + 1)]` (the output after all but the last two decoder layers, before the final norm) is kept
from position `crop_start` (108: the tokens of the system turn and of `<|im_start|>user\\n`) on.

Qwen2.5-VL's multimodal RoPE ("mrope") gives each of its three position axes (time, height, width) a section of
the rotary frequencies; for text alone all three axes hold the same position (transformers'
`Qwen2_5_VLTextModel` fills them with one arange), so it reduces to the ordinary 1-D RoPE of Qwen2, which is
what mlx_lm's Qwen2 applies. The rest of the decoder (q/k/v with bias, GQA, RMSNorm, SwiGLU) is Qwen2's.

Tokenization reads `tokenizer.json` with the `tokenizers` library, so its normalizer (NFC for Qwen2) applies:
transformers 5's `Qwen2Tokenizer` rebuilds the tokenizer from vocab.json and merges.txt and drops it.

Importing this module imports neither mlx_lm nor transformers; building the encoder imports
`mlx_lm.models.qwen2` (and mlx_lm's package imports transformers when it is first imported).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import mlx.core as mx

from mlx_video.convert.rules import KeyMap, Rule

from ..errors import MlxVideoError
from .llama import JsonTokenizer, TruncatedDecoder

if TYPE_CHECKING:
    from mlx_lm.models.qwen2 import ModelArgs

# The system message exactly as diffusers spells it (its source breaks the line with a backslash inside the
# string, so each numbered aspect is preceded by the continuation line's indentation). The 108 tokens that
# `CROP_START` removes depend on this spacing.
SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects:         "
    "1. The main content and theme of the video.         "
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.         "
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.         "
    "4. background environment, light, style and atmosphere.         "
    "5. camera angles, movements, and transitions used in the video."
)
CROP_START = 108
TEXT_TOKENS = 1000
SKIP_LAYERS = 2
PAD_TOKEN = "<|endoftext|>"

# Qwen2.5-VL's chat template (its tokenizer_config.json / chat_template.json) renders a system and a user turn with
# string contents, and the generation prompt, as this text.
CHAT_FORMAT = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def qwen_tokenizer(path) -> JsonTokenizer:
    """The released `tokenizer.json` (a file, or a folder holding it), padded with `tokenizer_config.json`'s pad
    token or else Qwen's <|endoftext|>."""
    return JsonTokenizer(path, pad_token=PAD_TOKEN)


def chat_text(prompt: str, system_message: str = SYSTEM_MESSAGE) -> str:
    """The chat-template text of one prompt; an empty prompt becomes a single space, as in diffusers."""
    return CHAT_FORMAT.format(system=system_message, user=prompt if prompt else " ")


def template_crop_start(tokenizer: JsonTokenizer, system_message: str = SYSTEM_MESSAGE) -> int:
    """The number of tokens before the prompt: those of the system turn and of `<|im_start|>user\\n`."""
    prefix = CHAT_FORMAT.split("{user}")[0].format(system=system_message)
    return len(tokenizer.encode(prefix))


def qwen2_args(config_json: dict) -> ModelArgs:
    """mlx_lm Qwen2 ModelArgs from a Qwen2.5-VL config.json: the full model's (text fields at the top, or in
    `text_config` as transformers 5 writes them) or `Qwen2_5_VLTextModel`'s. Imports mlx_lm."""
    from mlx_lm.models.qwen2 import ModelArgs

    config = dict(config_json.get("text_config") or config_json)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in config:
            raise MlxVideoError(f"the Qwen2.5-VL config.json has no {key!r}; is it a Qwen2.5-VL text model config?")
    rope = config.pop("rope_parameters", None) or config.pop("rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise MlxVideoError(f"Qwen2.5-VL text encoder: rope type {kind!r} is not supported (expected mrope)")
    config.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim * heads != config["hidden_size"]:
        raise MlxVideoError(f"Qwen2.5-VL text encoder: {heads} heads of {head_dim} do not make hidden size "
                            f"{config['hidden_size']}")
    config.setdefault("num_key_value_heads", heads)
    config["model_type"] = "qwen2"
    config["rope_scaling"] = None
    return ModelArgs.from_dict(config)


class Qwen25VLTextEncoder(TruncatedDecoder):
    """mlx_lm's Qwen2Model (as `model`) returning the hidden state `skip_layers + 1` from the end, unnormed."""

    def __init__(self, args: ModelArgs | dict, skip_layers: int = SKIP_LAYERS):
        from mlx_lm.models.qwen2 import Qwen2Model  # here, not at the top: mlx_lm's package imports transformers

        if isinstance(args, dict):
            args = qwen2_args(args)
        super().__init__(Qwen2Model(args), args.num_hidden_layers, skip_layers)
        self.args = args


def encode_prompts(
    encoder: Qwen25VLTextEncoder,
    tokenizer: JsonTokenizer,
    prompts: Sequence[str],
    system_message: str = SYSTEM_MESSAGE,
    crop_start: int | None = CROP_START,
    text_tokens: int = TEXT_TOKENS,
    truncate: bool = False,
) -> tuple[mx.array, mx.array]:
    """Text states (B, text_tokens, hidden) float32 and mask (B, text_tokens) int32 for the prompts.

    `crop_start` is checked against the tokenizer (None: take the tokenizer's count), so a tokenizer or system
    message that splits the prefix differently fails here instead of shifting every prompt. A prompt longer
    than `text_tokens` tokens raises unless `truncate` (diffusers truncates silently).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    counted = template_crop_start(tokenizer, system_message)
    if crop_start is None:
        crop_start = counted
    elif counted != crop_start:
        raise MlxVideoError(
            f"the tokenizer splits the chat template's system turn into {counted} tokens, expected {crop_start}; "
            "it is not the Qwen2.5-VL tokenizer the model was trained with (or the system message was changed)"
        )
    texts = [chat_text(p, system_message) for p in prompts]
    ids, mask = tokenizer(texts, crop_start + text_tokens, truncate=truncate)
    states = encoder(mx.array(ids), mx.array(mask))
    return states[:, crop_start:], mx.array(mask[:, crop_start:])


# --- checkpoint names -------------------------------------------------------------------------------------

# The language model's tensors under the names of: the released Qwen2.5-VL-7B-Instruct files and ComfyUI's
# single file (`model.` + Qwen2 names, the vision tower under `visual.`), transformers >= 4.52 / 5 saves of
# Qwen2_5_VLForConditionalGeneration (`model.language_model.`, `model.visual.`), and diffusers' text_encoder/
# (`Qwen2_5_VLTextModel`, no prefix). The vision tower and the LM head are not used.
_PREFIX = r"(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)?"
_LAYER = rf"{_PREFIX}layers\.(\d+)"

TRANSFORMERS_QWEN25VL_TEXT = KeyMap(
    [
        Rule(rf"{_PREFIX}embed_tokens\.weight", "model.embed_tokens.weight"),
        Rule(rf"{_LAYER}\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", r"model.layers.\1.self_attn.\2.\3"),
        Rule(rf"{_LAYER}\.self_attn\.o_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
        Rule(rf"{_LAYER}\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
        Rule(rf"{_LAYER}\.(input_layernorm|post_attention_layernorm)\.weight", r"model.layers.\1.\2.weight"),
        Rule(rf"{_PREFIX}norm\.weight", "model.norm.weight"),
    ],
    ignore=[
        r"(?:model\.|language_model\.)?lm_head\.weight",
        r"(?:model\.)?visual\..*",
        rf"{_LAYER}\.self_attn\.rotary_emb\.inv_freq",
    ],
)
