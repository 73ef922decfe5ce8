"""The packed float32 compute copy: same numbers as the model, follows patches, bounded memory."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lmpatch.machine import AVX2_ONLY
from lmpatch.model import packed
from lmpatch.model.packed import (
    PackedConv1D,
    PackedLinear,
    dtype_packable,
    pack_linears,
    packing_available,
    packing_wanted,
)
from lmpatch.model.shadow import computes_exactly
from test_patch import make_patch, mlp_out, shift_patch
from tiny import ARCHS, tiny_model

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")

IDS = torch.tensor([[1, 5, 9, 13, 2, 7], [3, 3, 8, 1, 4, 6]])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)])
def test_packed_linear_gives_the_linear_output_and_input_gradient(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias).requires_grad_(False)
    x = torch.randn(*shape, requires_grad=True)
    y = linear(x)
    (y * torch.arange(40.0)).sum().backward()
    want_grad = x.grad.clone()
    x.grad = None
    got = PackedLinear(linear)(x)
    (got * torch.arange(40.0)).sum().backward()
    torch.testing.assert_close(got, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, want_grad, atol=1e-5, rtol=1e-5)


def test_packed_conv1d_gives_gpt2s_output_and_input_gradient():
    """GPT-2 stores its projections' weights in x out; the stand-in must read them so."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(40, 24).requires_grad_(False)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 7, 24, requires_grad=True)
    y = conv(x)
    (y * torch.arange(40.0)).sum().backward()
    want_grad = x.grad.clone()
    x.grad = None
    stand_in = PackedConv1D(conv)
    got = stand_in(x)
    (got * torch.arange(40.0)).sum().backward()
    assert stand_in._packing.pair is not None  # it computed from the packed weights
    torch.testing.assert_close(got, y, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, want_grad, atol=1e-4, rtol=1e-5)


def test_a_weight_changed_in_place_is_repacked():
    linear = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
    layer = PackedLinear(linear)
    x = torch.randn(3, 8)
    before = layer(x)
    with torch.no_grad():
        linear.weight.mul_(2)
    torch.testing.assert_close(layer(x), 2 * before, atol=1e-5, rtol=1e-5)


def test_a_trainable_weight_is_not_read_from_a_stale_packed_copy():
    linear = torch.nn.Linear(8, 8, bias=False)  # requires grad: the gradient must reach it
    x = torch.randn(3, 8)
    PackedLinear(linear)(x).sum().backward()
    assert linear.weight.grad is not None


def test_hooks_of_a_replaced_linear_move_with_it():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)).requires_grad_(False)
    seen = []
    net[0].register_forward_hook(lambda _m, _a, out: seen.append(out))
    assert pack_linears(net) == 1
    assert isinstance(net[0], PackedLinear)
    net(torch.randn(2, 4))
    assert len(seen) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_the_packed_copy_computes_what_the_model_computes(arch):
    model = tiny_model(arch)
    net = model.network(torch.float32)
    assert net is not model.model and computes_exactly(model, net)
    assert any(isinstance(m, (PackedLinear, PackedConv1D)) for m in net.modules())
    params = {id(p) for p in model.model.parameters()}
    assert all(id(p) in params for p in net.parameters())  # shared, not copied
    with torch.no_grad():
        want = model.forward(input_ids=IDS).logits
        got = model.forward(input_ids=IDS, compute_dtype=torch.float32).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_packed_copy_follows_patches_and_added_modules():
    model = tiny_model("llama")
    with torch.no_grad():
        fast = lambda: model.forward(input_ids=IDS, compute_dtype=torch.float32).logits  # noqa: E731
        exact = lambda: model.forward(input_ids=IDS).logits  # noqa: E731
        before = fast()
        for patch in (make_patch(model, [(mlp_out(model, 0), "low_rank")]), shift_patch(model)):
            with patch.applied(model):
                edited = fast()
                torch.testing.assert_close(edited, exact(), atol=1e-4, rtol=1e-4)
                assert not torch.allclose(edited, before, atol=1e-3)
            torch.testing.assert_close(fast(), before, atol=1e-5, rtol=1e-5)


def test_no_packed_copy_beyond_the_memory_budget_or_in_other_dtypes(monkeypatch):
    model = tiny_model("llama")
    assert packing_wanted(model.model, torch.float32)
    assert packing_wanted(model.model, torch.bfloat16) == dtype_packable(torch.bfloat16)
    assert not packing_wanted(model.model, torch.float16)
    monkeypatch.setattr(packed, "MEMORY_SHARE", 0.0)
    assert not packing_wanted(model.model, torch.float32)
    assert model.network(torch.float32) is model.model


def test_the_bfloat16_copy_is_packed_where_onednn_can_and_follows_patches():
    """The low-precision copy computes from packed bfloat16 weights where oneDNN has
    bfloat16 kernels (plain products elsewhere: packing would raise there), re-packed when
    the copy is re-cast after a patch."""
    model = tiny_model("llama")
    net = model.network(torch.bfloat16)
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert dtype_packable(torch.bfloat16) == supported and dtype_packable(torch.float32)
    assert any(isinstance(m, PackedLinear) for m in net.modules()) == supported
    patch = make_patch(model, [(mlp_out(model, 0), "low_rank")])
    with torch.no_grad():
        before = model.forward(input_ids=IDS, compute_dtype=torch.bfloat16).logits.float()
        with patch.applied(model):
            edited = model.forward(input_ids=IDS, compute_dtype=torch.bfloat16).logits.float()
            exact = model.forward(input_ids=IDS).logits
        again = model.forward(input_ids=IDS, compute_dtype=torch.bfloat16).logits.float()
    assert float((edited - exact).abs().max()) < 0.05 * float(exact.abs().max())
    assert not torch.allclose(edited, before, atol=1e-2)
    assert torch.equal(again, before)


def test_the_avx2_hold_covers_every_kernel_library():
    """The packed products run in oneDNN and plain float32 products in MKL: an AVX2 timing
    must hold both to AVX2, besides torch's own kernels (which a child process reports)."""
    assert AVX2_ONLY.get("ONEDNN_MAX_CPU_ISA") == "AVX2"
    assert AVX2_ONLY.get("MKL_ENABLE_INSTRUCTIONS") == "AVX2"
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out in ("AVX2", "DEFAULT"), out
