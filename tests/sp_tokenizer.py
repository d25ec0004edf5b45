"""A local SentencePiece-style tokenizer (Llama-2 / Mistral layout) for detokenization tests.

Metaspace pieces ("▁word"), byte fallback (<0xNN> pieces for characters it has never seen) and a decoder
that strips the leading space of a sequence: decoding a streamed chunk on its own loses that space, and a
character spelled by byte pieces is split when its bytes span two chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

from enginesmith.builders.tiny_model import _CORPUS

UNSEEN = "Жук ест €5 — naïve 🙂!"
"""Has characters the tokenizer only knows as bytes (Ж, у, €, —) and multi-byte ones it learned (ï, 🙂)."""


def make_sp_tokenizer(out_dir: str | Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))])
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:  # byte pieces are ordinary vocabulary in SentencePiece, not special
        added["special"] = added["content"] in ("<unk>", "<s>", "</s>")
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return fast
