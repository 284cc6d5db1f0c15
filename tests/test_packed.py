"""Packed linear layers (``refiners.packed``): the same products and input gradients as ``nn.Linear``,
over the same parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from refiners.packed import PackedLinear, approximate_products, can_pack, pack_linear_layers
from tests.tiny_models import embedded_tokenizer, tiny_llama

pytestmark = pytest.mark.skipif(not can_pack(), reason="this PyTorch build has no oneDNN")


def frozen_linear(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(48, 80, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("proposal_dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_gives_the_product_and_the_input_gradient_of_the_linear_it_replaces(
    bias: bool, proposal_dtype: torch.dtype
) -> None:
    linear = frozen_linear(bias)
    packed = PackedLinear(linear, proposal_dtype)
    x = torch.randn(3, 12, 48)[:, ::2]  # not contiguous, as a slice of hidden states is
    with torch.no_grad():  # the forward is float32 whatever the backward's dtype
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(3, 6, 80)
    (g_packed,) = torch.autograd.grad((packed(x1) * upstream).sum(), x1)
    (g_plain,) = torch.autograd.grad((linear(x2) * upstream).sum(), x2)
    assert g_packed.dtype == torch.float32
    tolerance = 1e-5 if proposal_dtype == torch.float32 else 2e-2  # bfloat16 keeps 8 bits of mantissa
    torch.testing.assert_close(g_packed, g_plain, rtol=tolerance, atol=tolerance)
    assert packed.weight is linear.weight and packed.bias is linear.bias


@pytest.mark.parametrize("bias", [False, True])
def test_approximate_products_run_in_the_proposal_dtype_and_only_where_asked(bias: bool) -> None:
    linear = frozen_linear(bias)
    low, exact = PackedLinear(linear, torch.bfloat16), PackedLinear(linear, torch.float32)
    x = torch.randn(3, 12, 48)[:, ::2]
    with torch.no_grad():
        reference = linear(x)
        assert torch.equal(exact.approximate(x), exact(x))  # float32 proposals: the product itself
        rough = low.approximate(x)
        assert rough.dtype == torch.float32 and not torch.equal(rough, low(x))
        torch.testing.assert_close(rough, reference, rtol=2e-2, atol=2e-2)
        with approximate_products():
            assert torch.equal(low(x), rough)
        torch.testing.assert_close(low(x), reference, rtol=1e-5, atol=1e-5)  # exact again outside
    x = x.clone().requires_grad_(True)
    with approximate_products():  # a forward that takes a gradient stays exact
        torch.testing.assert_close(low(x).detach(), reference, rtol=1e-5, atol=1e-5)


def test_a_weight_changed_in_place_is_packed_again() -> None:
    linear = frozen_linear(False)
    packed = PackedLinear(linear)
    x = torch.randn(4, 48)
    packed(x)
    with torch.no_grad():
        linear.weight.mul_(2.0)
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)


def test_other_dtypes_run_the_plain_product() -> None:
    linear = frozen_linear(False).to(torch.bfloat16)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(PackedLinear(linear)(x), F.linear(x, linear.weight))


def test_a_packed_model_keeps_its_parameters_tied_weights_and_outputs() -> None:
    tokenizer = embedded_tokenizer()
    plain, packed = (tiny_llama(tokenizer, pack_weights=p).model for p in (False, True))
    for model in (plain, packed):  # tied after packing: the head packs the new weight on its next call
        model.lm_head.weight = model.model.embed_tokens.weight
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert all(type(m) is PackedLinear for m in packed.modules() if isinstance(m, nn.Linear))
    assert pack_linear_layers(nn.Sequential()) == 0
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    assert plain.state_dict().keys() == packed.state_dict().keys()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
        with approximate_products():  # the lookahead's passes
            rough = packed(ids).logits
        torch.testing.assert_close(rough, plain(ids).logits, rtol=5e-2, atol=5e-2)
    embeds = plain.get_input_embeddings()(ids)

    def gradient(model: nn.Module) -> torch.Tensor:
        e = embeds.clone().requires_grad_(True)
        return torch.autograd.grad(model(inputs_embeds=e).logits.log_softmax(-1)[..., 7].sum(), e)[0]

    default = gradient(packed)  # bfloat16 backward where the CPU has native bfloat16 products
    for m in packed.modules():
        if isinstance(m, PackedLinear):
            m.proposal_dtype = torch.float32
    torch.testing.assert_close(gradient(packed), gradient(plain), rtol=1e-4, atol=1e-4)
    assert F.cosine_similarity(default.flatten(), gradient(plain).flatten(), dim=0) > 0.999


def test_the_methods_multiply_by_the_embedding_table_through_a_tied_packed_head() -> None:
    from refiners import Refiner, SearchConfig

    loaded = tiny_llama(embedded_tokenizer())
    untied = Refiner(loaded).vocab
    loaded.model.lm_head.weight = loaded.model.model.embed_tokens.weight
    tied = Refiner(loaded).vocab
    assert untied._table_product is None and tied._table_product == loaded.model.lm_head.approximate
    exact = Refiner(loaded, search=SearchConfig(approximate_estimates=False)).vocab
    assert exact._table_product is loaded.model.lm_head
    x = torch.randn(5, loaded.model.config.hidden_size)
    with torch.no_grad():  # in bfloat16 where the CPU has it: the products only propose edits
        for vocab in (untied, tied):
            torch.testing.assert_close(vocab.times_table(x), x @ vocab.embedding.T, rtol=2e-2, atol=2e-2)
