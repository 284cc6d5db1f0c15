"""Linear layers whose weights are packed once for oneDNN: the CPU's float32 step 1.05-1.34x faster.

PyTorch runs a float32 ``nn.Linear`` on the CPU as an MKL GEMM that lays the weight out again in its
blocked format on every call. At one token row (decoding) MKL switches to a GEMV; at the few to few dozen
rows of a lookahead, gradient or scoring pass that repacking costs about as much as the product itself.
oneDNN takes a weight packed once, ahead of time (the kernels Inductor uses when it freezes a model).
``python -m benchmarks.speed --part packing`` measures it side by side (``README.md``, "Speed").

The parameters stay what they were (same tensors: tied weights stay tied, state dict keys unchanged);
the packed copies are extra memory: the weight and its transpose (the gradient pass back-propagates
through the transpose to the input; parameters are frozen, so no weight gradient), and where the
proposal dtype is bfloat16 a third, the weight in bfloat16.

Products that only propose edits run in bfloat16 where the CPU multiplies it natively (AVX512-BF16 or
AMX), 1.5-2x faster than float32: the transpose is packed in bfloat16 (the gradient's backward), and
``approximate`` (or any forward inside ``approximate_products``) multiplies by the bfloat16 copy of the
weight: the lookahead's passes and the methods' products with the embedding table. Every score stays
float32 and exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


class _PackedProduct(torch.autograd.Function):
    """x @ W.T + b with W packed, differentiable with respect to x only (through W.T packed, in the
    dtype it was packed in)."""

    @staticmethod
    def forward(ctx, x, packed, packed_t, bias):  # type: ignore[override]
        ctx.packed_t = packed_t
        return _product(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_x = _product(grad.to(ctx.packed_t.dtype).contiguous(), ctx.packed_t, None)
        return grad_x.to(grad.dtype), None, None, None


def can_pack() -> bool:
    """Whether this PyTorch build has oneDNN and its packed linear kernels."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def default_proposal_dtype() -> torch.dtype:
    """The dtype of products that only propose edits: bfloat16 where this CPU has native bfloat16
    products (on one without, oneDNN emulates them, several times slower than float32), else float32."""
    native = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.bfloat16 if any(f is not None and f() for f in native) else torch.float32


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` over the same parameters whose float32 CPU forward uses packed weights.

    Anything else (another device or dtype, a parameter that takes gradients) runs ``F.linear``; a
    weight changed in place or moved is packed again on the next call.
    """

    def __init__(self, linear: nn.Linear, proposal_dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.proposal_dtype = proposal_dtype or default_proposal_dtype()
        self._packed_for: tuple[int, int, torch.dtype] | None = None

    def _key(self) -> tuple[int, int, torch.dtype]:
        return self.weight.data_ptr(), self.weight._version, self.proposal_dtype

    def _packs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight packed, and its transpose in ``proposal_dtype``; with a ``proposal_dtype`` other
        than the weight's, also the weight in it (``_approximate``). All made at once, at load: a
        model's memory does not grow at its first lookahead."""
        if self._packed_for != self._key():
            low = self.weight.detach().to(self.proposal_dtype)
            self._packed, self._packed_t = _pack(self.weight), _pack(low.t())
            self._approximate = _pack(low) if low.dtype != self.weight.dtype else None
            self._packed_for = self._key()
        return self._packed, self._packed_t

    def _runs_packed(self, x: torch.Tensor) -> bool:
        w, b = self.weight, self.bias
        return (
            x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32
            and not w.requires_grad
            and not (b is not None and b.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._runs_packed(x):
            return F.linear(x, self.weight, self.bias)
        packed, packed_t = self._packs()
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedProduct.apply(x, packed, packed_t, self.bias)
        if getattr(_approximating, "on", False) and self.proposal_dtype != x.dtype:
            return self._approximate_product(x)
        return _product(x, packed, self.bias)

    def approximate(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` computed in ``proposal_dtype``, returned in x's dtype, without a gradient: for
        estimates that only rank proposals."""
        if self.proposal_dtype == x.dtype or not self._runs_packed(x):
            return self(x).detach()
        return self._approximate_product(x.detach())

    def _approximate_product(self, x: torch.Tensor) -> torch.Tensor:
        self._packs()
        bias = None if self.bias is None else self.bias.to(self.proposal_dtype)
        return _product(x.to(self.proposal_dtype), self._approximate, bias).to(x.dtype)


_approximating = threading.local()


@contextmanager
def approximate_products() -> Iterator[None]:
    """Inside, on this thread, a ``PackedLinear`` forward that takes no gradient runs as ``approximate``:
    for passes whose values only rank proposals (the lookahead). Activations stay float32."""
    before = getattr(_approximating, "on", False)
    _approximating.on = True
    try:
        yield
    finally:
        _approximating.on = before


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of a float32 CPU model by a ``PackedLinear`` over the same
    parameters, packed now; returns how many were replaced (0 where oneDNN is missing)."""
    if not can_pack():
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.device.type == "cpu"
                and child.weight.dtype == torch.float32
            ):
                packed = PackedLinear(child)
                packed._packs()
                setattr(module, name, packed)
                replaced += 1
    return replaced
