"""T5 / UMT5 tokenizer: SentencePiece `spiece.model`, or a `tokenizers` `tokenizer.json`.

Calling it gives the same ids and mask as transformers'
`tokenizer(texts, padding="max_length", max_length=..., truncation=True, add_special_tokens=True)`:
the text's pieces, cut to leave room for EOS, then EOS, then `<pad>` (mask 0) up to max_length.

Hub repositories ship both files; transformers 5 saves only tokenizer.json. When both are present the
SentencePiece model is used: it is the original, and it honours the vocabulary's byte fallback (UMT5 has one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MlxVideoError

SPIECE_FILE = "spiece.model"
TOKENIZER_JSON_FILE = "tokenizer.json"


class _SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise MlxVideoError(f"could not read the SentencePiece model {path}: {e}") from e

    def token_id(self, piece: str) -> int | None:
        i = self.processor.piece_to_id(piece)
        return i if self.processor.id_to_piece(i) == piece else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, out_type=int)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()


class _TokenizersBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON
            raise MlxVideoError(f"could not read the tokenizer file {path}: {e}") from e
        # Padding and truncation are ours to apply; a tokenizer.json may carry its own settings.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def token_id(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


class T5Tokenizer:
    def __init__(self, backend: _SentencePieceBackend | _TokenizersBackend, source: Path):
        self._backend = backend
        ids = {piece: backend.token_id(piece) for piece in ("</s>", "<pad>")}
        missing = [piece for piece, i in ids.items() if i is None]
        if missing:
            raise MlxVideoError(
                f"the tokenizer in {source} has no {' or '.join(missing)} token; is it a T5 tokenizer?"
            )
        self.eos_id = ids["</s>"]
        self.pad_id = ids["<pad>"]

    @classmethod
    def from_folder(cls, path: str | Path) -> "T5Tokenizer":
        folder = Path(path)
        if not folder.is_dir():
            raise MlxVideoError(
                f"tokenizer folder {folder} does not exist (expected {SPIECE_FILE} or {TOKENIZER_JSON_FILE} in it)"
            )
        spiece, tokenizer_json = folder / SPIECE_FILE, folder / TOKENIZER_JSON_FILE
        if spiece.is_file():
            return cls(_SentencePieceBackend(spiece), spiece)
        if tokenizer_json.is_file():
            return cls(_TokenizersBackend(tokenizer_json), tokenizer_json)
        raise MlxVideoError(f"no tokenizer in {folder}: expected {SPIECE_FILE} or {TOKENIZER_JSON_FILE}")

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def __call__(self, texts: list[str], max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int32 of shape (len(texts), max_length)."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for EOS), got {max_length}")
        input_ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
        attention_mask = np.zeros((len(texts), max_length), dtype=np.int32)
        for row, ids in enumerate(self._backend.encode(list(texts))):
            ids = ids[: max_length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask
