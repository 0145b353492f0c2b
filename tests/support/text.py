"""A SentencePiece model in T5's layout trained in a second on a few sentences, and prompts for tokenizer parity."""

from __future__ import annotations

import io

# ---- a SentencePiece model trained on a few sentences ----
SENTENCES = [
    "A cat walks on the grass in the sunny garden.",
    "Two dogs run along the beach at sunset, splashing through the waves.",
    "The camera slowly pans across a city skyline at night.",
    "A red car drives fast down the winding mountain road.",
    "一只猫在阳光明媚的花园里的草地上散步。",
    "Ein Hund läuft am Strand entlang.",
]

PROMPTS = [
    "A cat walks on the grass.",
    "",
    "Two dogs run along the beach at sunset, splashing through the waves, while the camera slowly pans.",
    "一只猫在草地上散步。",
    "A  red car,\tat night",
    "The camera zooms in on a winding road",
]


def train_sentencepiece(folder, byte_fallback: bool):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 3),
        model_writer=model,
        model_type="unigram",
        vocab_size=64 + (256 if byte_fallback else 0),
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=byte_fallback,
        # T5's layout: <pad> 0, </s> 1, <unk> 2, no BOS.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder
