"""The quantized weights on the fast decode path: the Triton kernels reading int8 / int4 (`gemv` with its
folded norm, gating and residual; `qmatmul` for several tokens) against the dequantized weight, in fp32;
fusing quantized layers; and the fused decode step over them against the quantized model's own forward.

Without a GPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from support.decoding import fresh_model, step_logits  # noqa: E402

from flash_vstream.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from flash_vstream.model.quantization import QuantizedWeight, quantize_model, quantize_weight  # noqa: E402
from flash_vstream.runtime import triton_kernels as tk  # noqa: E402
from flash_vstream.runtime.decoder import GreedyDecoder  # noqa: E402
from flash_vstream.runtime.fused_decode import FusedDecodeStep, fuse_projections  # noqa: E402
from flash_vstream.runtime.fusing import forget_fused, fuse_linears, fused_tensors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CLOSE = dict(rtol=1e-4, atol=1e-4)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean() + eps) * weight


def _kw(q, config=None):
    return dict(scales=q.scales, zeros=q.zeros, group_size=q.group_size, config=config)


# (bits, n, k, group size, config): blocks that do and do not divide the rows and the groups
@pytest.mark.parametrize("bits,n,k,group,config", [
    (8, 40, 96, None, (16, 32, 4)), (8, 48, 128, None, None), (8, 48, 128, None, (8, 32, 2, 2)),
    (4, 40, 128, 64, (16, 1, 2)), (4, 48, 384, 128, (16, 2, 2)), (4, 48, 256, 128, None),
    (4, 40, 640, 64, (8, 4, 1, 2))])
def test_quantized_gemv_with_its_folded_prologues(bits, n, k, group, config):
    torch.manual_seed(n + k + bits)
    w = torch.randn(n, k, device=DEVICE)
    q = quantize_weight(w, bits, group_size=group or 128)
    dense = q.dequantize()
    x, g, r, gate_up = (torch.randn(*s, device=DEVICE) for s in ((k,), (k,), (n,), (2 * k,)))
    torch.testing.assert_close(tk.gemv(x, q.qweight, **_kw(q, config)), dense @ x, **CLOSE)
    torch.testing.assert_close(tk.gemv(x.view(1, 1, k), q.qweight, norm=g, eps=1e-6, residual=r, **_kw(q, config)),
                               dense @ _rms(x, g, 1e-6) + r, **CLOSE)
    torch.testing.assert_close(tk.gemv(gate_up, q.qweight, gated=True, residual=r.view(1, 1, n), **_kw(q, config)),
                               dense @ (F.silu(gate_up[:k]) * gate_up[k:]) + r, **CLOSE)
    # paired: the rows are [gate; up] and the n / 2 outputs silu(gate) * up, with the norm and a residual
    both = dense @ _rms(x, g, 1e-6)
    torch.testing.assert_close(tk.gemv(x, q.qweight, norm=g, eps=1e-6, residual=r[:n // 2], paired=True,
                                       **_kw(q, config)),
                               F.silu(both[:n // 2]) * both[n // 2:] + r[:n // 2], **CLOSE)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_qmatmul_against_the_dequantized_weight(bits, m):
    """Several tokens at once (prefill, a question after the kept prefix): rows and outputs that do not
    fill a tile."""
    torch.manual_seed(m + bits)
    w = torch.randn(40, 256, device=DEVICE)
    q = quantize_weight(w, bits)
    x = torch.randn(2, m, 256, device=DEVICE)
    got = tk.qmatmul(x, q.qweight, q.scales, q.zeros, q.group_size)
    assert got.shape == (2, m, 40)
    torch.testing.assert_close(got, x @ q.dequantize().T, **CLOSE)


def test_quantized_kernels_reject_what_they_cannot_read():
    q4, q8 = quantize_weight(torch.randn(16, 64), 4), quantize_weight(torch.randn(16, 64), 8)
    with pytest.raises(ValueError, match="an int8 \\(16, 64\\) weight takes \\(16,\\) scales"):
        tk.gemv(torch.randn(64), q8.qweight, scales=q4.scales)
    with pytest.raises(ValueError, match="int4 group size 16 must be a power of two >= 32"):
        tk.gemv(torch.randn(64), q4.qweight, scales=q4.scales, zeros=q4.zeros, group_size=16)
    with pytest.raises(ValueError, match="takes \\(16, 1\\) scales and zeros"):
        tk.qmatmul(torch.randn(3, 64), q4.qweight, q4.scales, None, 64)
    with pytest.raises(ValueError, match="65 input values"):
        tk.qmatmul(torch.randn(3, 65), q8.qweight, q8.scales)
    with pytest.raises(ValueError, match="int8 or packed uint8, not torch.float32"):
        tk.qmatmul(torch.randn(3, 64), torch.randn(16, 64), q8.scales)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fusing_quantized_layers_keeps_values_and_memory(scheme):
    model = quantize_model(fresh_model(21), scheme)
    attn = model.get_model().layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    before = [p.quantized().dequantize() for p in parts]
    fused, bias = fuse_linears(parts, attn, "fused_qkv")
    assert isinstance(fused, QuantizedWeight) and bias is None
    assert fused.shape == (sum(p.out_features for p in parts), parts[0].in_features)
    assert parts[1].qweight.data_ptr() == fused.qweight[parts[0].out_features].data_ptr()  # a row slice
    for p, b in zip(parts, before):
        torch.testing.assert_close(p.quantized().dequantize(), b, rtol=0, atol=0)
    torch.testing.assert_close(fused.dequantize(), torch.cat(before), rtol=0, atol=0)
    assert fused_tensors(parts, attn, "fused_qkv")[0].qweight is fused.qweight  # idempotent, read back
    with pytest.raises(ValueError, match="some of the layers to fuse are quantized and some are not"):
        fuse_linears([attn.q_proj, torch.nn.Linear(64, 64, bias=False)], attn, "mixed")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_step_over_quantized_weights_equals_the_model(scheme):
    """The decode step the GPU graph replays (fused products; Triton kernels reading int8 / int4), and the
    same step with dequantized products: the quantized model's own logits over the same cache, and its
    `generate` tokens."""
    # one layer and a 64-token vocabulary: Triton's interpreter runs every program of every product
    model = quantize_model(fresh_model(22, vocab_size=64, num_hidden_layers=1), scheme).to(DEVICE)
    ids, memory = torch.tensor([1, 45, IMAGE_TOKEN_INDEX, 17, 33]), torch.randn(40, 32, device=DEVICE)
    with torch.no_grad():
        reference = model.generate(ids[None].to(DEVICE), memory=[memory], max_new_tokens=3, do_sample=False)
    fuse_projections(model)
    bits = 8 if scheme == "int8" else 4
    assert all(isinstance(w, QuantizedWeight) and w.bits == bits for pair in FusedDecodeStep(model).weights
               for w in pair)  # the step reads the quantized values, fused
    plain = GreedyDecoder(model, max_cache_len=128)
    fused = GreedyDecoder(model, max_cache_len=128, fused_step=True, warmup_steps=1).setup()
    triton = GreedyDecoder(model, max_cache_len=128, fused_step=True, triton_kernels=True, warmup_steps=1).setup()
    assert (fused.mode, triton.mode) == ("fused_eager", "triton_eager"), (fused.errors, triton.errors)
    assert torch.equal(triton.generate(ids, memory, max_new_tokens=3).to(reference.device), reference)
    logits = step_logits((plain, fused, triton), ids, memory, 0)
    torch.testing.assert_close(logits[1], logits[0], **CLOSE)
    torch.testing.assert_close(logits[2], logits[0], **CLOSE)


def test_forget_fused_drops_what_to_would_leave_behind():
    """The fused tensors are plain attributes: `.to()` moves parameters and buffers, not them. After
    `forget_fused` none is left, the model still answers, and fusing again works."""
    model = fresh_model(23)
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fuse_projections(model)
    assert forget_fused(model) == 2 * len(model.get_model().layers)  # a q/k/v and a gate/up weight per layer
    assert not [k for m in model.modules() for k, v in vars(m).items() if isinstance(v, torch.Tensor)
                and k not in m._parameters and k not in m._buffers]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert len(fuse_projections(model)) == len(model.get_model().layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_default_gpu_path_equals_its_eager_decoder(scheme):
    """On CUDA, strict: the quantized model's default fast path (fused Triton step over int8 / int4,
    compiled, in a CUDA graph; questions after the kept prefix through `qmatmul` in graphs) gives the
    tokens of its eager static-cache loop (the dequantizing forward), and the compiled kernels equal the
    dequantized products."""
    from flash_vstream.runtime.fast_path import FastPath
    from flash_vstream.runtime.options import FastPathOptions

    model = quantize_model(fresh_model(24), scheme, device="cuda")
    prompt, memory = torch.tensor([1, 45, 9, IMAGE_TOKEN_INDEX, 17, 33, 4]), torch.randn(681, 32, device="cuda")
    eager = FastPath(model, FastPathOptions(enabled=True, cuda_graph=False, compile_decode=False, fused_weights=False,
                                            triton=False, compile_vision=False, pad_suffix=False, strict=True))
    want = eager.decoder(768).generate(prompt, memory, max_new_tokens=16)
    path = FastPath(model, FastPathOptions(enabled=True, strict=True)).fuse_weights()
    fast = path.decoder(768).setup()
    assert fast.mode == "triton_compiled_cuda_graph", fast.errors
    assert torch.equal(fast.generate(prompt, memory, max_new_tokens=16), want)
    fast.cache_prefix(prompt[:4], memory)
    assert torch.equal(fast.generate(prompt, memory, max_new_tokens=16), want)  # the suffix graph (qmatmul)
    for m in (1, 32):
        w = quantize_weight(torch.randn(4096, 4096, device="cuda"), 8 if scheme == "int8" else 4)
        x = torch.randn(m, 4096, device="cuda")
        got = tk.gemv(x, w.qweight, **_kw(w)) if m == 1 else tk.qmatmul(x, w.qweight, w.scales, w.zeros, w.group_size)
        torch.testing.assert_close(got.view(m, -1), x @ w.dequantize().T, rtol=1e-3, atol=1e-3)
