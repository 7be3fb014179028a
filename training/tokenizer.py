"""Byte-level BPE tokenizer trained with the `tokenizers` library (pretraining from scratch)."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


def train_bpe(files: list[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer with `vocab_size` entries; id 0 is <|endoftext|> (BOS and EOS)."""
    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE vocabulary needs more than 256 entries, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    return tok


def eos_id(tok: Tokenizer) -> int | None:
    """The id of the end-of-text token of a tokenizer, trying the usual names."""
    for name in (EOS_TOKEN, "</s>", "<|im_end|>", "<eos>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None
