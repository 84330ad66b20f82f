"""The fast path on a real GPU, strict (a part that cannot run fails the test, naming why): CUDA graphs
replay what the eager code computes, and the Triton kernels, compiled for the device (not Triton's
interpreter), compute what PyTorch computes. Skipped without CUDA; `python -m pytest -m gpu tests/runtime`."""

import os

import pytest
import torch
import torch.nn.functional as F

from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.runtime.fast_path import FastPath
from flash_vstream.runtime.options import FastPathOptions
from support.decoding import fresh_model, reference, step_logits

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = torch.tensor([1, 45, 9, IMAGE_TOKEN_INDEX, 17, 33, 4])
EAGER = dict(enabled=True, cuda_graph=False, compile_decode=False, fused_weights=False, triton=False,
             compile_vision=False, pad_suffix=False, strict=True)  # the static-cache loop, eager: the reference


def _model(seed):
    return fresh_model(seed).to("cuda")  # fp32: the graphs and kernels against the same arithmetic eagerly


def test_cuda_graph_decoder_equals_eager():
    """The model's own step as a CUDA graph, and questions after a kept prefix as bucket graphs: the eager
    decoder's tokens, which are `generate`'s."""
    model = _model(41)
    memory = torch.randn(681, 32, device="cuda")
    eager = FastPath(model, FastPathOptions(**EAGER)).decoder(1024)
    graphed_path = FastPath(model, FastPathOptions(**{**EAGER, "cuda_graph": True, "pad_suffix": True}))
    graphed = graphed_path.decoder(1024).setup()
    assert graphed.mode == "cuda_graph" and graphed._graph is not None
    want = eager.generate(PROMPT, memory, max_new_tokens=24)
    assert torch.equal(want.cpu(), reference(model, PROMPT.cuda(), memory, 24, None).cpu())
    assert torch.equal(graphed.generate(PROMPT, memory, max_new_tokens=24), want)
    prefix = PROMPT[:4]
    graphed.cache_prefix(prefix, memory)
    for question in (torch.tensor([17, 33, 4]), torch.arange(40, 80)):  # buckets of 32 and 64 tokens
        ids = torch.cat([prefix, question])
        assert graphed.prefix_matches(ids, memory)
        assert torch.equal(graphed.generate(ids, memory, max_new_tokens=12),
                           eager.generate(ids, memory, max_new_tokens=12))
    assert sorted(graphed._suffix) == [32, 64] and all(entry[4] is not None for entry in graphed._suffix.values())
    assert graphed_path.describe()["fallbacks"] == {}


def test_default_gpu_path_triton_compiled_graph_equals_eager():
    """What "auto" picks on CUDA -- the fused decode step, its products as Triton kernels, compiled, in a
    CUDA graph -- gives the eager decoder's tokens; the Triton step's logits are the model's."""
    model = _model(42)
    memory = torch.randn(681, 32, device="cuda")
    eager = FastPath(model, FastPathOptions(**EAGER)).decoder(768)
    want = eager.generate(PROMPT, memory, max_new_tokens=16)
    path = FastPath(model, FastPathOptions(enabled=True, strict=True))
    assert path.options.cuda_graph and path.options.fused_weights and path.options.triton
    path.fuse_weights()
    fast = path.decoder(768).setup()
    assert fast.mode == "triton_compiled_cuda_graph", fast.errors
    assert torch.equal(fast.generate(PROMPT, memory, max_new_tokens=16), want)
    triton_eager = path.new_decoder(768, cuda_graph=False, compile_decode=False, pad_suffix=False).setup()
    assert triton_eager.mode == "triton_eager"
    logits = step_logits((eager, triton_eager), PROMPT, memory, 3)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    described = path.describe()
    assert described["decode"] == "triton_compiled_cuda_graph" and described["fallbacks"] == {}


def test_triton_kernels_compiled_for_real_equal_pytorch():
    """bf16 at the 7B and CLIP-L shapes, compiled for this GPU: the decode product with its folded RMSNorm
    and residual, fc1 + QuickGELU (TMA), CLIP attention with token 0 apart."""
    from flash_vstream.runtime import triton_kernels as tk

    assert os.environ.get("TRITON_INTERPRET") != "1" and tk.usable(torch.zeros(1, device="cuda"))
    torch.manual_seed(43)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    w, x, g, r = torch.randn(12288, 4096, **bf16) / 64, torch.randn(4096, **bf16), torch.rand(4096, **bf16), \
        torch.randn(12288, **bf16)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * g.float()
    torch.testing.assert_close(tk.gemv(x, w, norm=g, eps=1e-5, residual=r).float(), w.float() @ normed + r.float(),
                               rtol=2e-2, atol=2e-2)
    a, w1, b1 = torch.randn(2, 257, 1024, **bf16), torch.randn(4096, 1024, **bf16) / 32, torch.randn(4096, **bf16)
    ref = F.linear(a.float(), w1.float(), b1.float())
    torch.testing.assert_close(tk.linear_quick_gelu(a, w1, b1, programs=tk.multiprocessors(a.device)).float(),
                               ref * torch.sigmoid(1.702 * ref), rtol=2e-2, atol=2e-2)
    qkv = torch.randn(8, 257, 3 * 16 * 64, **bf16)
    q, k, v = qkv.float().view(8, 257, 3, 16, 64).permute(2, 0, 3, 1, 4).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.125).transpose(1, 2).reshape(8, 257, 1024)
    torch.testing.assert_close(tk.attention(qkv, 16, 0.125).float(), want, rtol=2e-2, atol=2e-2)


def test_graphed_vision_encoder_equals_eager(tiny_clip_dir):
    """The one-frame CLIP forward as a CUDA graph: the eager (tower's own) features bit for bit; the batched
    path compiled with the Triton kernels: the tower's features up to rounding."""
    from flash_vstream.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    tower = CLIPVisionTower(tiny_clip_dir)
    tower.vision_tower.to("cuda").eval()
    with torch.no_grad():
        for param in tower.vision_tower.parameters():  # loaded in place from the file: aligned copies for TMA
            param.data = param.data.clone()
    path = FastPath(tower=tower, options=FastPathOptions(enabled=True, strict=True))
    assert path.options.cuda_graph and path.options.compile_vision
    encoder = path.fuse_weights().vision()
    assert encoder.graphed and encoder.compiled and encoder.triton
    pixels = torch.randn(4, 3, 32, 32, device="cuda")
    for i in range(2):  # replays read the new input each time
        assert torch.equal(encoder(pixels[i:i + 1]), encoder.eager(pixels[i:i + 1]))
    torch.testing.assert_close(encoder(pixels), tower(pixels), rtol=1e-4, atol=1e-4)
    described = path.describe()
    assert described["vision"]["one_frame"] == "cuda_graph" and described["fallbacks"] == {}
