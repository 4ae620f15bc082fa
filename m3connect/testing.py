"""Tiny random checkpoints in the real BGE-M3 layout, and the bundled sample corpus.

The real model cannot be downloaded everywhere (CI has no hub access), so tests,
examples and benchmarks build a small random ``XLMRobertaModel`` with a trained
toy tokenizer and the two head files. It loads through exactly the code path
``BAAI/bge-m3`` does.

>>> from m3connect.testing import make_tiny_checkpoint
>>> path = make_tiny_checkpoint("/tmp/tiny-m3")            # doctest: +SKIP
>>> M3Encoder(path, device="cpu")                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["make_tiny_checkpoint", "sample_corpus", "synthetic_corpus", "SPECIAL_TOKENS"]

# Ids 0..3 as in XLM-R: <s>=CLS, <pad>, </s>=EOS, <unk>; <mask> goes last as in the real vocab.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]

_WORDS = (
    "vector search dense sparse colbert token model query passage document hybrid fusion "
    "weight score engine index collection milvus qdrant opensearch river valley rain bread "
    "oven starter light water sugar oxygen bank rate inflation train storm museum visitor "
    "plant sun rice saffron goal match coast bicycle snow road spring cherry blossom"
).split()


def sample_corpus() -> list[dict[str, Any]]:
    """The 40 short multilingual documents bundled with the package (id, text, lang, topic)."""
    text = resources.files("m3connect").joinpath("data/sample_corpus.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def synthetic_corpus(n: int, *, min_words: int = 10, max_words: int = 400, seed: int = 0) -> list[str]:
    """``n`` pseudo-random texts of ``min_words``..``max_words`` words, reproducible by seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = _WORDS + [d["text"].split()[0] for d in sample_corpus()]
    out: list[str] = []
    for _ in range(n):
        k = int(rng.integers(min_words, max_words + 1))
        out.append(" ".join(vocab[int(j)] for j in rng.integers(0, len(vocab), size=k)))
    return out


def _training_texts() -> Iterable[str]:
    for doc in sample_corpus():
        yield doc["text"]
    yield " ".join(_WORDS)
    yield from synthetic_corpus(200, min_words=5, max_words=40, seed=1)


def _unigram_vocab(size: int) -> list[tuple[str, float]]:
    """A Unigram vocabulary counted from the training texts, the same on every run.

    (The tokenizers library's ``UnigramTrainer`` is not deterministic across runs, which
    made test checkpoints, and so test rankings, differ from one session to the next.)
    Special tokens first, then every character seen (so nothing is unknown), then the
    most frequent whole words, each scored by its log frequency.
    """
    import math
    import string
    import unicodedata
    from collections import Counter

    words: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    for text in _training_texts():
        for word in unicodedata.normalize("NFKC", text).split():
            words["\u2581" + word] += 1
            chars.update(word)
    chars.update(c for c in string.printable if not c.isspace())  # punctuation never unknown
    total = sum(words.values()) + sum(chars.values())
    pieces = [(t, 0.0) for t in SPECIAL_TOKENS] + [("\u2581", math.log(len(words) / total))]
    pieces += [(c, math.log(n / total) - 10.0) for c, n in sorted(chars.items(), key=lambda t: (-t[1], t[0]))]
    seen = {p for p, _ in pieces}
    ranked = [(w, math.log(n / total)) for w, n in sorted(words.items(), key=lambda t: (-t[1], t[0])) if w not in seen]
    return (pieces + ranked)[: max(size, len(pieces))]


def _calibrated_sparse_head(model: Any, tokenizer: Any, hidden_size: int) -> Any:
    """A random sparse head shifted and scaled like BGE-M3's: tokens weigh about 0.1-0.4.

    An uncalibrated random head leaves nearly every token at ``relu(x) = 0``, and a demo
    whose sparse scores are all 0 looks broken, so the head is calibrated on the training
    texts: texts that share tokens get a positive sparse score, as with the real model.
    """
    import torch

    head = torch.nn.Linear(hidden_size, 1)
    texts = [t for _, t in zip(range(64), _training_texts())]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
        keep = batch["attention_mask"].bool() & (batch["input_ids"] > 3)
        # A wide random init makes the tokens of one text point almost the same way, so a
        # random head gives a text all-zero or all-positive weights. Read the head along the
        # direction in which tokens of the same text differ most, as a trained head does.
        mean = (hidden * keep[..., None]).sum(1, keepdim=True) / keep.sum(1).clamp(min=1)[:, None, None]
        within = (hidden - mean)[keep]
        direction = torch.linalg.svd(within - within.mean(0), full_matrices=False).Vh[0]
        head.weight.copy_(direction[None, :] * torch.sign(head.weight[0, 0] + 1e-12))
        head.bias.zero_()
        pre = head(hidden).squeeze(-1)[keep]
        # weight = 0.25 + 0.06 * z (z: the standardised projection): nearly every token is
        # positive, shared tokens add ~0.06 each, and no two weights tie.
        scale = 0.06 / max(float(pre.std()), 1e-6)
        head.weight.mul_(scale)
        head.bias.fill_(0.25 - float(pre.mean()) * scale)
    return head


def make_tiny_checkpoint(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    vocab_size: int = 1000,
    max_position_embeddings: int = 8194,
    colbert_dim: int | None = None,
    seed: int = 0,
    initializer_range: float = 0.6,
    safetensors: bool = True,
) -> Path:
    """Write a random BGE-M3-layout checkpoint to ``path`` and return it.

    Deterministic for a given seed and shape. Takes a second or two for the defaults.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # transformers 5 keeps XLMRobertaTokenizerFast only as a lazy alias its stubs do not declare
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast  # type: ignore[attr-defined]

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.Unigram(_unigram_vocab(vocab_size - 1), unk_id=SPECIAL_TOKENS.index("<unk>")))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=max_position_embeddings - 2,
    )
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        # The usual 0.02 makes every CLS vector nearly identical (cosine ~0.99999);
        # a wide init spreads the scores so that rankings in tests mean something.
        initializer_range=initializer_range,
    )
    model = XLMRobertaModel(config)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" would be noise in a demo
    try:
        model.save_pretrained(out, safe_serialization=safetensors)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    torch.save(_calibrated_sparse_head(model, fast, hidden_size).state_dict(), out / "sparse_linear.pt")
    torch.save(torch.nn.Linear(hidden_size, colbert_dim or hidden_size).state_dict(), out / "colbert_linear.pt")
    return out
