"""The fast CLIP path (runtime/vision.py) against the tower."""

import torch


def test_fast_vision_encoder_paths():
    """One frame and eager(): the tower's own modules, bit for bit. The batched path (fused q/k/v, patch
    embedding as a product; compiled on CUDA) computes the same features up to rounding, and fusing
    re-points the tower's weights instead of copying them."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from flash_vstream.runtime.vision import FastVisionEncoder

    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14, hidden_act="quick_gelu")
    torch.manual_seed(7)
    clip = CLIPVisionModel._from_config(config, attn_implementation="sdpa").eval()
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        stock = clip(pixels, output_hidden_states=True).hidden_states[-2]  # (3, 1 + 4, 64)
        one = clip(pixels[:1], output_hidden_states=True).hidden_states[-2][:, 1:]  # CPU kernels round per batch size
    fast = FastVisionEncoder(clip, select_layer=-2, select_feature="patch")
    assert len(fast.layers) == 2
    assert torch.equal(fast.eager(pixels), stock[:, 1:]) and torch.equal(fast(pixels[:1]), one)
    fast.fuse_weights()  # a step of its own: it re-points the tower's q/k/v weights
    fused = fast.fused(pixels)
    torch.testing.assert_close(fused, stock[:, 1:], rtol=1e-5, atol=1e-5)
    attn = fast.layers[1].self_attn
    assert attn.v_proj.weight.data_ptr() == attn.fused_qkv_weight[2 * 64].data_ptr()
    assert attn.k_proj.bias.data_ptr() == attn.fused_qkv_bias[64:].data_ptr()
    with torch.no_grad():  # the tower itself still computes the same
        assert torch.equal(clip(pixels, output_hidden_states=True).hidden_states[-2], stock)
    fast.compile(backend="eager")  # the trace alone (quick on CPU); the GPU compiles with Inductor
    assert fast.compiled and torch.equal(fast(pixels), fused)
    assert torch.equal(fast(pixels[:1]), one)  # one frame keeps the exact path
    keep_cls = FastVisionEncoder(clip, select_layer=1, select_feature="cls_patch").fuse_weights()
    with torch.no_grad():
        torch.testing.assert_close(keep_cls.fused(pixels), clip(pixels, output_hidden_states=True).hidden_states[1],
                                   rtol=1e-5, atol=1e-5)
