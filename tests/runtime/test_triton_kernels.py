"""The Triton kernels of the GPU fast paths (runtime/triton_kernels.py), against PyTorch, in fp32.

Without a GPU they run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1): the same kernel
code, tile by tile in numpy, so the indexing, masking and the online softmax are checked here; speed
is the benchmark's business (docs/benchmarks.md).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from support.decoding import fresh_model as _fresh_model, reference as _reference, step_logits as _step_logits  # noqa: E402

from flash_vstream.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from flash_vstream.runtime import triton_kernels as tk  # noqa: E402
from flash_vstream.runtime.decoder import GreedyDecoder  # noqa: E402
from flash_vstream.runtime.fused_decode import FusedDecodeStep, fuse_projections  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean() + eps) * weight


@pytest.mark.parametrize("n,k,config", [(64, 96, (8, 64, 4)), (40, 100, (16, 32, 4)), (48, 128, None)])
def test_gemv_with_its_folded_prologues_and_residual(n, k, config):
    """Plain, RMS-normalised and SiLU-gated inputs, with and without a residual; shapes that do and do not
    divide into the blocks (masked loads and stores)."""
    torch.manual_seed(n + k)
    w, x, g, r = (torch.randn(*shape, device=DEVICE) for shape in ((n, k), (k,), (k,), (n,)))
    gate_up = torch.randn(2 * k, device=DEVICE)
    close = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tk.gemv(x, w, config=config), w @ x, **close)
    torch.testing.assert_close(tk.gemv(x.view(1, 1, k), w, norm=g, eps=1e-6, config=config), w @ _rms(x, g, 1e-6),
                               **close)
    torch.testing.assert_close(tk.gemv(x, w, norm=g, eps=1e-6, residual=r, config=config),
                               w @ _rms(x, g, 1e-6) + r, **close)
    torch.testing.assert_close(tk.gemv(gate_up, w, gated=True, residual=r.view(1, 1, n), config=config),
                               w @ (F.silu(gate_up[:k]) * gate_up[k:]) + r, **close)
    both = w @ _rms(x, g, 1e-6)  # paired: rows [gate; up] -> silu(gate) * up, n / 2 values
    torch.testing.assert_close(tk.gemv(x, w, norm=g, eps=1e-6, residual=r[:n // 2], paired=True, config=config),
                               F.silu(both[:n // 2]) * both[n // 2:] + r[:n // 2], **close)
    with pytest.raises(ValueError, match="residual"):
        tk.gemv(x, w, residual=r, paired=True)  # n / 2 outputs


def test_gemv_rejects_what_it_cannot_read():
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="33 input values for a \\(16, 32\\) weight"):
        tk.gemv(torch.randn(33), w)
    with pytest.raises(ValueError, match="gated"):
        tk.gemv(torch.randn(32), w, gated=True)  # gated wants [gate | up]: 64 values
    with pytest.raises(ValueError, match="contiguous"):
        tk.gemv(torch.randn(16), w.t())


def test_gemv_configs_cover_the_7b_shapes():
    """Every 7B product gets blocks that divide it (no masked loads in the hot loop)."""
    for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)):
        for element_size in (2, 1):  # bf16, int8
            block_n, block_k, _, _ = tk.gemv_config(n, k, element_size)
            assert n % block_n == 0 and k % block_k == 0, (n, k, element_size)


@pytest.mark.parametrize("m,n,k", [(300, 96, 128), (37, 64, 32)])
def test_linear_quick_gelu(m, n, k):
    """fc1 + bias + QuickGELU; rows and columns that do not fill a tile (TMA zero-fills and clips), a
    width below the default block."""
    torch.manual_seed(m)
    x, w, b = torch.randn(2, m, k, device=DEVICE), torch.randn(n, k, device=DEVICE) * 0.1, torch.randn(n, device=DEVICE)
    ref = F.linear(x, w, b)
    got = tk.linear_quick_gelu(x, w, b, config=(64, 32, 32, 2, 4, 2))
    assert got.shape == (2, m, n)
    torch.testing.assert_close(got, ref * torch.sigmoid(1.702 * ref), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of"):
        tk.linear_quick_gelu(torch.randn(4, 24), torch.randn(8, 24), torch.randn(8))


@pytest.mark.parametrize("n,heads,head_dim,config", [(17, 2, 16, (16, 16, 4, 1)), (37, 3, 32, (16, 16, 4, 1)),
                                                     (33, 2, 16, (16, 32, 4, 1)), (257, 2, 16, None)])
def test_attention_takes_token_zero_apart_exactly(n, heads, head_dim, config):
    """softmax(q k^T s) v from a fused (B, N, 3 D) projection, against SDPA: key counts with and without a
    partial last block, and CLIP's 257 tokens with the default blocks. Giving token 0 a dominant key
    checks that it is counted (once) in every row."""
    torch.manual_seed(n)
    qkv = torch.randn(2, n, 3 * heads * head_dim, device=DEVICE)
    qkv[:, 0, heads * head_dim:2 * heads * head_dim] *= 6  # token 0's key: large scores
    q, k, v = qkv.view(2, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2).reshape(2, n, heads * head_dim)
    torch.testing.assert_close(tk.attention(qkv, heads, 0.3, config=config), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not q, k, v"):
        tk.attention(torch.randn(1, 5, 3 * 2 * 12), 2, 0.3)  # head size 12: not a power of two


@pytest.mark.slow  # a long end-to-end run: CI's second step (.ci/run)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_triton_decode_step_equals_generate(kv_heads):
    """The Triton step (what the GPU graph captures by default): `generate`'s tokens, and the model's own
    logits for a decode step over the same prefilled cache."""
    model = _fresh_model(11, num_key_value_heads=kv_heads).to(DEVICE)
    ids, memory = torch.tensor([1, 45, IMAGE_TOKEN_INDEX, 17, 33]), torch.randn(681, 32, device=DEVICE)
    reference = _reference(model, ids.to(DEVICE), memory, 8, None)
    fuse_projections(model)
    decoder = GreedyDecoder(model, max_cache_len=768, cuda_graph=False, compile_step=False, fused_step=True,
                            triton_kernels=True)
    decoder.setup()
    assert decoder.mode == "triton_eager", decoder.errors
    assert torch.equal(decoder.generate(ids, memory, max_new_tokens=8).to(reference.device), reference)
    plain = GreedyDecoder(model, max_cache_len=768, cuda_graph=False, compile_step=False, fused_step=False)
    logits = _step_logits((plain, decoder), ids, memory, 2)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_triton_step_refuses_other_activations():
    model = _fresh_model(12, hidden_act="gelu")
    with pytest.raises(NotImplementedError, match="'gelu' \\(SiLU only\\)"):
        FusedDecodeStep(model, triton=True)
    decoder = GreedyDecoder(model, max_cache_len=256, fused_step=True, triton_kernels=True)
    decoder.setup()
    assert decoder.mode == "eager" and "SiLU" in decoder.errors["triton"]  # recorded, the plain step kept


def test_fast_vision_encoder_with_triton_kernels(tiny_clip_dir):
    """The batched CLIP path with its two Triton kernels (attention, fc1 + QuickGELU) on the real 16 x 16
    patch grid (257 tokens): the tower's features up to rounding."""
    from transformers import CLIPVisionModel

    from flash_vstream.runtime.vision import FastVisionEncoder

    clip = CLIPVisionModel.from_pretrained(tiny_clip_dir).eval().to(DEVICE)
    with torch.no_grad():
        for param in clip.parameters():  # loaded in place from the file: not all 16-byte aligned, as TMA needs
            param.data = param.data.clone()
    fast = FastVisionEncoder(clip, select_layer=-2, select_feature="patch")
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)
    stock = fast.eager(pixels)
    fast.fuse_weights()
    fast.use_triton()
    assert fast.triton and fast.triton_fc1  # CLIP's QuickGELU, aligned weights: both kernels run
    torch.testing.assert_close(fast.fused(pixels), stock, rtol=1e-4, atol=1e-4)
    assert fast(pixels[:1]).shape == (1, 256, 32)


def test_without_triton_the_kernels_say_so(monkeypatch, tiny_clip_dir):
    """A CPU install without Triton: nothing picks the kernels, and asking for one names what is missing."""
    from transformers import CLIPVisionModel

    from flash_vstream.runtime.vision import FastVisionEncoder

    monkeypatch.setattr(tk, "triton", None)
    assert not tk.usable(torch.zeros(1))
    with pytest.raises(ImportError, match="gemv is a Triton kernel: pip install triton"):
        tk.gemv(torch.randn(4), torch.randn(2, 4))
    encoder = FastVisionEncoder(CLIPVisionModel.from_pretrained(tiny_clip_dir).eval())
    with pytest.raises(ImportError, match="Triton is not installed"):
        encoder.use_triton()
    encoder.fuse_weights().compile(backend="eager")  # the default on a machine without Triton: PyTorch's kernels
    assert encoder.compiled and not encoder.triton
