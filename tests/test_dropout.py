"""CPU dropout from 16-bit random lanes (mop.dropout): the keep rate, its seed, the
gradients, attention dropout against the math it replaces, and that a BERT forward in the
runtime's context no longer calls PyTorch's serial Bernoulli sampler."""

import contextlib
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import BertConfig, BertModel

from mop.dropout import LANES, CpuDropout, _Masked, attention, dropout, keep_mask
from mop.runtime import Runtime


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_in_every_lane(p):
    n = 400_000  # per lane
    keep = keep_mask((n, LANES), p, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.shape == (n, LANES)
    sigma = math.sqrt(p * (1 - p) / n)
    # Each of the four lanes of a 64-bit draw (a column here) keeps 1 - p: a lane whose
    # top bit were never set (torch's default random_() range) would fail this.
    for lane in range(LANES):
        assert abs(keep[:, lane].float().mean().item() - (1 - p)) < 5 * sigma
    # Neighbouring elements are independent: P(both kept) = (1 - p)^2.
    both = (keep[:, 0] & keep[:, 1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / n)


def test_keep_mask_follows_the_seeded_generator_and_odd_shapes():
    a = keep_mask((3, 5, 7), 0.3, torch.Generator().manual_seed(1))
    b = keep_mask((3, 5, 7), 0.3, torch.Generator().manual_seed(1))
    c = keep_mask((3, 5, 7), 0.3, torch.Generator().manual_seed(2))
    assert a.shape == (3, 5, 7) and torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(4)
    d = keep_mask((3, 5, 7), 0.3)
    torch.manual_seed(4)
    assert torch.equal(d, keep_mask((3, 5, 7), 0.3))  # the global generator by default


def test_dropout_zeroes_the_masked_elements_and_scales_the_rest():
    x = torch.randn(6, 50, requires_grad=True)
    torch.manual_seed(0)
    out = dropout(x, 0.25)
    torch.manual_seed(0)
    keep = keep_mask(x.shape, 0.25)
    assert torch.allclose(out, torch.where(keep, x / 0.75, 0))
    out.sum().backward()
    assert torch.allclose(x.grad, keep.float() / 0.75)
    assert dropout(x, 0.0) is x and torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_masked_gradient_is_exact():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    keep = keep_mask(x.shape, 0.4, torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(lambda t: _Masked.apply(t, keep, 1 / 0.6), (x,))


def _qkv(seed: int = 0, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, requires_grad=requires_grad) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
def test_attention_with_dropout_is_the_math_path_with_our_mask(mask_kind):
    q, k, v = _qkv()
    allowed = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    allowed[0, ..., 3:] = False  # the first sequence has 2 padding positions
    mask = {
        "none": None,
        "additive": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo().min),
        "bool": allowed,
    }[mask_kind]
    torch.manual_seed(7)
    out = attention(q, k, v, mask, 0.2, None)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]

    q2, k2, v2 = _qkv()
    torch.manual_seed(7)
    keep = keep_mask((2, 3, 5, 5), 0.2)
    scores = q2 @ k2.transpose(-2, -1) / 2.0
    if mask is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1)
    ref = (probs * keep / 0.8) @ v2
    ref.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad), strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    if mask is not None:  # padding keys get no weight and no gradient
        assert torch.all(k.grad[0, :, 3:] == 0)


def test_the_mode_replaces_training_dropout_only():
    q, k, v = _qkv(requires_grad=False)
    x = torch.randn(8, 8)
    plain = F.scaled_dot_product_attention(q, k, v)
    with CpuDropout():
        # Inference: no dropout, PyTorch's own kernels, identical results.
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), plain)
        assert torch.equal(F.dropout(x, 0.5, training=False), x)
        torch.manual_seed(3)
        fused = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
        torch.manual_seed(3)
        assert torch.equal(fused, attention(q, k, v, None, 0.3, None))
        torch.manual_seed(3)
        y = F.dropout(x, 0.5)
        torch.manual_seed(3)
        assert torch.equal(y, dropout(x, 0.5))
        inplace = x.clone()
        torch.manual_seed(3)
        F.dropout(inplace, 0.5, True, True)
        assert torch.equal(inplace, y)


def _ops(model: torch.nn.Module, ids: torch.Tensor, context) -> set[str]:
    with torch.profiler.profile() as prof, context:
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().backward()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_in_the_cpu_runtime_draws_no_bernoulli_masks(attn):
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = BertModel(cfg).train()
    ids = torch.randint(5, 50, (2, 12))
    rt = Runtime.create("cpu", "fp32", threads=1)
    ours = _ops(model, ids, rt.forward_context())
    assert "aten::bernoulli_" not in ours and "aten::random_" in ours
    assert "aten::bernoulli_" in _ops(model, ids, contextlib.nullcontext())
    # Evaluation forwards are PyTorch's own (the mode is not even entered), and identical.
    model.eval()
    with torch.inference_mode():
        plain = model(input_ids=ids).last_hidden_state
        with rt.forward_context():
            assert not torch.overrides._get_current_function_mode_stack()
            assert torch.equal(model(input_ids=ids).last_hidden_state, plain)
