"""The ByT5 glyph encoder: the text a prompt puts in quotes, encoded byte by byte by a T5 v1.1 encoder
(byT5-small with the Glyph-SDXL-v2 weights and its colour and font tokens), on our `T5Encoder`.

Usage (a converted ByT5 folder with its `config.json`; `added_tokens` from `glyph_tokens(...)` or a saved
tokenizer's `tokenizer_config.json`):

    encoder = T5Encoder(T5Config.from_dict(folder.config("text_encoder_2")))
    folder.load_module("text_encoder_2", encoder)
    tokenizer = ByT5Tokenizer.from_folder(folder.path / "tokenizer_2")
    states, mask = encode_glyphs(encoder, tokenizer, ['A neon sign that reads "OPEN"'])
    # states (B, 256, 1472) float32, mask (B, 256) int32; all zeros for a prompt without quotes

What it does, as diffusers 0.42.1's `HunyuanVideo15Pipeline._get_byt5_prompt_embeds` does: the texts between
straight ("...") or curly (“...”) quotes are collected (repeats dropped when there are several) and written as
`Text "a". Text "b". `; that string is tokenized as ByT5 does (UTF-8 bytes shifted by 3 after <pad>, </s>,
<unk>; added tokens matched whole; </s> appended; right padding to 256) and encoded; the output is the final-norm
hidden state. A prompt without quoted text gets zeros and an all-zero mask.

Checkpoints: transformers `T5EncoderModel` / `T5ForConditionalGeneration` names (diffusers' text_encoder_2/,
google/byt5-small), and the Glyph-SDXL-v2 `byt5_model.pt`: the state dict of transformers' `T5Stack` (the
encoder alone), bare or under `state_dict` with the prefix `module.text_tower.encoder.` (the official
HunyuanVideo-1.5 loader keeps only those keys). Read it with `read_glyph_checkpoint`, never with `torch.load`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import numpy as np

from mlx_video.convert.rules import KeyMap, Rule, convert_weights

from ..errors import MlxVideoError
from .t5 import T5Config, T5Encoder

GLYPH_TOKENS = 256
BYTE_OFFSET = 3  # <pad> 0, </s> 1, <unk> 2, then the 256 byte values
EXTRA_IDS = 125  # <extra_id_0> .. <extra_id_124>: ids 259 .. 383
BASE_VOCAB = BYTE_OFFSET + 256 + EXTRA_IDS
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

_QUOTED = re.compile(r"\"(.*?)\"|“(.*?)”")


def glyph_text(prompt: str) -> str | None:
    """The glyph string of a prompt: `Text "a". Text "b". ` for its quoted texts, None without any."""
    found = [straight or curly for straight, curly in _QUOTED.findall(prompt)]
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    if not found:
        return None
    return ". ".join(f'Text "{text}"' for text in found) + ". "


def glyph_tokens(color_idx: Mapping[str, int], font_idx: Mapping[str, int]) -> list[str]:
    """The tokens Glyph-SDXL-v2 adds to ByT5 (multilingual form), in order: `<color-i>` for each colour of
    `assets/color_idx.json`, then `<xx-font-i>` for each font of `assets/multilingual_10-lang_idx.json`
    (xx: the font code's first two letters, i: its index)."""
    colors = [f"<color-{i}>" for i in range(len(color_idx))]
    fonts = [f"<{code[:2]}-font-{index}>" for code, index in font_idx.items()]
    return colors + fonts


def glyph_tokens_from_folder(glyph_root: str | Path) -> list[str]:
    """`glyph_tokens` read from a Glyph-SDXL-v2 folder's assets/."""
    assets = Path(glyph_root) / "assets"
    tables = []
    for name in ("color_idx.json", "multilingual_10-lang_idx.json"):
        try:
            table = json.loads((assets / name).read_text())
        except (OSError, ValueError) as e:
            raise MlxVideoError(f"could not read the Glyph-SDXL-v2 table {assets / name}: {e}") from e
        if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
            raise MlxVideoError(f"{assets / name} is not a JSON object of names to indices")
        tables.append(table)
    return glyph_tokens(*tables)


class ByT5Tokenizer:
    """ByT5's byte tokenizer with its special tokens and any added ones (ids from 384 on, in order).

    Calling it gives transformers' `ByT5Tokenizer(...)(texts, padding="max_length", max_length=..., truncation=
    True)`: <pad>, </s> and <unk> swallow the whitespace around them; other added tokens keep it.
    """

    def __init__(self, added_tokens: Sequence[str] = ()):
        self.specials = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
        self.ids = {**self.specials, **{f"<extra_id_{i}>": BYTE_OFFSET + 256 + i for i in range(EXTRA_IDS)}}
        self.vocab_size = BASE_VOCAB
        for token in added_tokens:
            if token not in self.ids:  # as transformers' add_tokens: a token already known keeps its id
                self.ids[token] = self.vocab_size
                self.vocab_size += 1
        pieces = sorted(self.ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ByT5Tokenizer":
        """From a saved tokenizer folder: the added tokens of `added_tokens.json` ({token: id}) or of
        `tokenizer_config.json`'s `added_tokens_decoder`, ids from 384 on; no file: none added."""
        folder = Path(folder)
        added: dict[str, int] = {}
        try:
            if (folder / "added_tokens.json").is_file():
                added = {str(k): int(v) for k, v in json.loads((folder / "added_tokens.json").read_text()).items()}
            elif (folder / "tokenizer_config.json").is_file():
                decoder = json.loads((folder / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
                added = {entry["content"]: int(i) for i, entry in decoder.items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise MlxVideoError(f"could not read the ByT5 tokenizer files in {folder}: {e}") from e
        extra = sorted((i, t) for t, i in added.items() if i >= BASE_VOCAB)
        if [i for i, _ in extra] != list(range(BASE_VOCAB, BASE_VOCAB + len(extra))):
            raise MlxVideoError(f"the added tokens in {folder} do not take the ids {BASE_VOCAB} on in order")
        return cls([t for _, t in extra])

    def encode(self, text: str) -> list[int]:
        """Token ids without </s>."""
        ids: list[int] = []
        parts = self._split.split(text)
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.ids[part])
                continue
            if k > 0 and parts[k - 1] in self.specials:
                part = part.lstrip()
            if k + 1 < len(parts) and parts[k + 1] in self.specials:
                part = part.rstrip()
            ids.extend(b + BYTE_OFFSET for b in part.encode("utf-8"))
        return ids

    def __call__(self, texts: Sequence[str], max_length: int = GLYPH_TOKENS) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), each (len(texts), max_length) int32: cut to leave room for </s> (not added twice)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = np.full((len(texts), max_length), PAD_ID, dtype=np.int32)
        mask = np.zeros((len(texts), max_length), dtype=np.int32)
        for row, text in enumerate(texts):
            tokens = self.encode(text)[: max_length - 1]
            if not tokens or tokens[-1] != EOS_ID:
                tokens.append(EOS_ID)
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


def encode_glyphs(
    encoder: T5Encoder, tokenizer: ByT5Tokenizer, prompts: Sequence[str], max_length: int = GLYPH_TOKENS
) -> tuple[mx.array, mx.array]:
    """Glyph states (B, max_length, dim) float32 and mask (B, max_length) int32 for the prompts' quoted texts;
    zeros for a prompt without any. The encoder runs only on the prompts that have some."""
    if isinstance(prompts, str):
        prompts = [prompts]
    texts = [glyph_text(p) for p in prompts]
    states = np.zeros((len(prompts), max_length, encoder.config.dim), dtype=np.float32)
    mask = np.zeros((len(prompts), max_length), dtype=np.int32)
    rows = [i for i, t in enumerate(texts) if t is not None]
    if rows:
        ids, row_mask = tokenizer([texts[i] for i in rows], max_length)
        encoded = encoder(mx.array(ids), mx.array(row_mask))
        states[rows] = np.array(encoded.astype(mx.float32))
        mask[rows] = row_mask
    return mx.array(states), mx.array(mask)


# --- checkpoints ------------------------------------------------------------------------------------------

_PREFIX = r"(?:encoder\.|module\.text_tower\.encoder\.)?"
_BLOCK = rf"{_PREFIX}block\.(\d+)\.layer"

BYT5_KEYS = KeyMap(
    [
        Rule(r"shared\.weight", "token_embedding.weight"),
        Rule(rf"{_PREFIX}embed_tokens\.weight", "token_embedding.weight"),
        # T5 keeps one relative-position table, in the first layer, shared by all layers.
        Rule(_BLOCK + r"\.0\.SelfAttention\.relative_attention_bias\.weight", "pos_bias.weight"),
        Rule(_BLOCK + r"\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
        Rule(_BLOCK + r"\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
        Rule(_BLOCK + r"\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
        Rule(_BLOCK + r"\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.weight"),
        Rule(_BLOCK + r"\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
        Rule(_BLOCK + r"\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
        Rule(rf"{_PREFIX}final_layer_norm\.weight", "norm.weight"),
    ],
    # The decoder and LM head of T5ForConditionalGeneration; in a Glyph-SDXL-v2 training state dict, what lies
    # outside the text tower's encoder (the official loader drops it too).
    ignore=[r"decoder\..*", r"lm_head\.weight", r"module\.(?!text_tower\.encoder\.).*"],
)


def convert_byt5_weights(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """ByT5 tensors (any of the names above) -> T5Encoder names; the tied embedding stored twice is kept once."""
    if "shared.weight" in weights and "encoder.embed_tokens.weight" in weights:
        weights = {k: v for k, v in weights.items() if k != "encoder.embed_tokens.weight"}
    return convert_weights(BYT5_KEYS, weights)


def byt5_config(config_json: dict, weights: Mapping[str, mx.array]) -> T5Config:
    """Our T5Config from byT5-small's config.json, its vocabulary taken from the converted embedding's rows
    (Glyph-SDXL-v2 grows it by its added tokens)."""
    config = T5Config.from_transformers(config_json)
    if "token_embedding.weight" not in weights:
        raise MlxVideoError("the ByT5 weights have no token embedding (shared.weight / embed_tokens.weight)")
    rows = weights["token_embedding.weight"].shape[0]
    return T5Config.from_dict({**config.to_dict(), "vocab_size": rows})


def read_glyph_checkpoint(path: str | Path) -> dict[str, mx.array]:
    """The tensors of a Glyph-SDXL-v2 `byt5_model.pt`, read by our restricted pickle reader (no code runs),
    converted to T5Encoder names."""
    from mlx_video.convert.pth import open_state_dict

    checkpoint = open_state_dict(path)
    unknown = BYT5_KEYS.unknown_keys(checkpoint.keys())
    if unknown:
        raise MlxVideoError(f"{path} is not a ByT5 encoder state dict: unknown keys {unknown[:5]}")
    return convert_byt5_weights({k: v for k, v in checkpoint.items() if BYT5_KEYS.target(k) is not None})


def read_glyph_release(text_encoder_folder: str | Path) -> tuple[T5Config, dict[str, mx.array], list[str]]:
    """(config, converted weights, added tokens) of the glyph encoder from the official release's text_encoder/:
    `byt5-small/config.json` (the architecture; its weights are all replaced, as the official loader's strict
    load of the Glyph checkpoint does), `Glyph-SDXL-v2/checkpoints/byt5_model.pt` and `Glyph-SDXL-v2/assets/`
    (the added tokens, which set the vocabulary's size)."""
    root = Path(text_encoder_folder)
    config_file = root / "byt5-small" / "config.json"
    checkpoint = root / "Glyph-SDXL-v2" / "checkpoints" / "byt5_model.pt"
    for needed in (config_file, checkpoint):
        if not needed.is_file():
            raise MlxVideoError(f"the glyph encoder needs {needed} (official layout: text_encoder/byt5-small/ and "
                                "text_encoder/Glyph-SDXL-v2/ with checkpoints/byt5_model.pt and assets/)")
    try:
        config_json = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise MlxVideoError(f"could not read {config_file}: {e}") from e
    added = glyph_tokens_from_folder(root / "Glyph-SDXL-v2")
    weights = read_glyph_checkpoint(checkpoint)
    config = byt5_config(config_json, weights)
    expected = ByT5Tokenizer(added).vocab_size  # a token named twice is added once, as by transformers
    if config.vocab_size != expected:
        raise MlxVideoError(f"{checkpoint} embeds {config.vocab_size} tokens, but ByT5 with the tokens of "
                            f"Glyph-SDXL-v2's assets has {expected}")
    return config, weights, added
