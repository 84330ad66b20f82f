"""`FastVisionEncoder`: the CLIP patch features `CLIPVisionTower` returns, computed faster.

Used by the realtime session (one frame at a time: a CUDA graph), the feature extractor and the
benchmark (batched: regional `torch.compile`).
"""

import torch
import torch.nn.functional as F

from . import triton_kernels
from .cuda_utils import capture_graph, sync
from .fusing import fuse_linears
from .options import FastPathError
from .triton_kernels import attention, linear_quick_gelu, multiprocessors, usable


class FastVisionEncoder:
    """CLIP patch features exactly as `CLIPVisionTower` returns them (layer `select_layer`), faster.

    - Stops after the selected layer. The stock forward runs every layer and keeps every hidden state;
      with the released select_layer=-2 the last of ViT-L's 24 layers is wasted work.
    - `capture()`: a CUDA graph of the whole batch-1 forward for streaming: one launch instead of ~400
      small kernels, which is what a one-frame forward is limited by.
    - `compile()`, for batched extraction: regional torch.compile of one layer function (one compiled
      graph shared by all layers and batch sizes >= 2) and of the embedding, which fuses the QuickGELU,
      LayerNorm and residual element-wise work into a few kernels. That path (`fused()` uncompiled)
      also runs each layer's q/k/v projections as one product (`fuse_weights()`, a step of its own: the
      tower's own weights re-pointed into one matrix, no extra memory) and the patch embedding (a stride-14
      14x14 convolution) as one matrix product over the flattened patches instead of a cuDNN
      convolution with two layout conversions. On CUDA it also runs two Triton kernels
      (`triton_kernels`): attention that takes the class token's key apart (257 keys otherwise cost
      SDPA's kernels a third tile of 128) and fc1 with bias and QuickGELU in its epilogue (the
      4096-wide activation written once). What each step buys is measured in docs/benchmarks.md.

    One frame (and `eager()`) runs the tower's own modules, so its features equal `CLIPVisionTower`'s
    bit for bit (the realtime session's equality checks rely on it); the batched path rounds
    differently, as any compiled kernel does.
    """

    def __init__(self, vision_model, select_layer=-2, select_feature="patch", warmup_stream=None, strict=False):
        """Build it after the tower has its final device and dtype: it keeps views of the tower's weights.
        `warmup_stream`: the side stream `capture` warms up on (`FastPath` passes its one); `strict`: a
        failed capture raises `FastPathError` instead of keeping the eager forward."""
        core = getattr(vision_model, "vision_model", vision_model)  # 5.x: the CLIPVisionModel itself
        self.embeddings = emb = core.embeddings
        self.pre_norm = core.pre_layrnorm
        conv = emb.patch_embedding
        self.patch = conv.kernel_size[0]
        self.patch_weight = conv.weight.reshape(conv.out_channels, -1)  # (D, 3 * p * p): a view, channel-major
        self.patch_bias = conv.bias
        self.class_embedding = emb.class_embedding  # (D,)
        self.position_embedding = emb.position_embedding.weight  # (1 + 256, D)
        layers = core.encoder.layers
        keep = len(layers) + 1 + select_layer if select_layer < 0 else select_layer  # hidden_states[i] = after i layers
        self.layers = list(layers[:keep])
        attn = self.layers[0].self_attn if self.layers else None
        self.heads = attn.num_heads if attn is not None else 0
        self.scale = attn.scale if attn is not None else None
        self.act = self.layers[0].mlp.activation_fn if self.layers else None  # one activation for all layers
        self.quick_gelu = getattr(getattr(core, "config", None), "hidden_act", None) == "quick_gelu"
        self.triton = self.triton_fc1 = False  # the fused path's Triton kernels (see use_triton)
        self._programs = None  # the fc1 kernel's program count on this device (looked up by use_triton)
        self._weights = None  # per layer, for the fused path: built by fuse_weights()
        self.skip_cls = select_feature == "patch"
        first = next(vision_model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._layer, self._embed = self.layer_forward, self.embed  # compile() swaps in compiled versions
        self.compiled = False
        self.graph_error = None
        self._graph = None
        self.warmup_stream = warmup_stream
        self.strict = bool(strict)

    @staticmethod
    def _layer_weights(layer):
        attn, mlp = layer.self_attn, layer.mlp
        qkv_weight, qkv_bias = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj], attn, "fused_qkv")
        return dict(norm1=(layer.layer_norm1.weight, layer.layer_norm1.bias, layer.layer_norm1.eps),
                    qkv=(qkv_weight, qkv_bias), out=(attn.out_proj.weight, attn.out_proj.bias),
                    norm2=(layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps),
                    fc1=(mlp.fc1.weight, mlp.fc1.bias), fc2=(mlp.fc2.weight, mlp.fc2.bias))

    def embed(self, pixels):
        """(B, 3, S, S) -> (B, 1 + 256, D): class token and patch tokens plus positions, pre-LayerNorm."""
        b, c, s, _ = pixels.shape
        grid = s // self.patch
        patches = pixels.reshape(b, c, grid, self.patch, grid, self.patch).permute(0, 2, 4, 1, 3, 5)
        tokens = F.linear(patches.reshape(b, grid * grid, -1), self.patch_weight, self.patch_bias)  # (B, 256, D)
        cls = self.class_embedding.view(1, 1, -1).expand(b, 1, -1)
        return self.pre_norm(torch.cat([cls, tokens], dim=1) + self.position_embedding)

    def layer_forward(self, hidden, w):
        """One CLIP encoder layer (pre-LN attention and MLP, residuals) over `w` from `_layer_weights`."""
        b, n, d = hidden.shape
        x = F.layer_norm(hidden, (d,), *w["norm1"])
        qkv = F.linear(x, *w["qkv"])  # (B, N, 3 D)
        if self.triton:
            attn = attention(qkv, self.heads, self.scale)  # (B, N, D)
        else:
            q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            attn = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(b, n, d)
        hidden = hidden + F.linear(attn, *w["out"])
        x = F.layer_norm(hidden, (d,), *w["norm2"])
        if self.triton_fc1:
            x = linear_quick_gelu(x, *w["fc1"], programs=self._programs)
        else:
            x = self.act(F.linear(x, *w["fc1"]))
        return hidden + F.linear(x, *w["fc2"])

    def stock_embed(self, pixels):
        return self.pre_norm(self.embeddings(pixels))

    @staticmethod
    def stock_layer(hidden, layer):
        out = layer(hidden, None)
        return out[0] if isinstance(out, tuple) else out

    def fuse_weights(self):
        """Fuse each kept layer's q/k/v into one matrix, in place (the tower's own weights re-pointed:
        same values, same memory; idempotent). The fused path needs it; do it before any CUDA graph is
        captured on this tower, since a graph holds the old weights' addresses."""
        if self._weights is None:
            self._weights = [self._layer_weights(layer) for layer in self.layers]
        return self

    @property
    def fused_weights(self):
        return self._weights is not None

    @property
    def weights(self):
        """Per layer: the weights of the fused path (after `fuse_weights()`)."""
        if self._weights is None:
            raise RuntimeError("FastVisionEncoder: the fused path needs fused q/k/v weights: call fuse_weights() "
                               "(FastPath.fuse_weights()) first")
        return self._weights

    def _run(self, pixels, embed, layer, per_layer):
        hidden = embed(pixels.to(device=self.device, dtype=self.dtype))  # (B, 1 + 256, D)
        for item in per_layer:
            hidden = layer(hidden, item)
        return hidden[:, 1:] if self.skip_cls else hidden  # (B, 256, D)

    @torch.inference_mode()
    def __call__(self, pixels):
        """(B, 3, S, S) normalised pixels -> (B, 256, D) features (a fresh tensor)."""
        if pixels.shape[0] == 1 and self._graph is not None:
            self._static_in.copy_(pixels)
            self._graph.replay()
            return self._static_out.clone()
        if pixels.shape[0] > 1 and self.compiled:
            return self._run(pixels, self._embed, self._layer, self.weights)
        return self.eager(pixels)

    def eager(self, pixels, per_frame_embedding=False):
        """The tower's own modules, stopped at the selected layer. `per_frame_embedding`: the patch embedding
        (a convolution) frame by frame, the layers over the batch: on CPU a convolution over a batch rounds
        differently from one over a frame, so this keeps every frame's features those of a one-frame forward
        (the batched ingest of several streams relies on it)."""
        embed = self.stock_embed
        if per_frame_embedding:
            def embed(batch):
                tokens = torch.cat([self.embeddings(batch[i:i + 1]) for i in range(batch.shape[0])])  # (B, 257, D)
                return self.pre_norm(tokens)  # row-wise: the batch does not change a frame's values
        with torch.inference_mode():
            return self._run(pixels, embed, self.stock_layer, self.layers)

    def fused(self, pixels):
        """What `compile()` compiles, run uncompiled: fused q/k/v, patch embedding as a product."""
        with torch.inference_mode():
            return self._run(pixels, self.embed, self.layer_forward, self.weights)

    def compile(self, mode=None, triton=None, **options):
        """Compile the embedding and the layer function (lazily, at the first batched call).

        triton: `use_triton`'s choice; None = when Triton runs on this device. Needs `fuse_weights()`."""
        self.weights  # fused before, never inside the first compiled call
        self.use_triton(usable(self.patch_weight) if triton is None else triton)
        self._embed = torch.compile(self.embed, dynamic=True, mode=mode, **options)
        self._layer = torch.compile(self.layer_forward, dynamic=True, mode=mode, **options)
        self.compiled = True

    def uncompile(self):
        self._layer, self._embed = self.layer_forward, self.embed
        self.compiled = False
        self.use_triton(False)

    def use_triton(self, enable=True):
        """Run the fused path's attention as `triton_kernels.attention` instead of SDPA, and fc1 with its
        bias and QuickGELU as `linear_quick_gelu` instead of cuBLAS and an element-wise kernel. The fc1
        kernel reads its weights by TMA, which needs them 16-byte aligned, and applies QuickGELU only:
        otherwise fc1 stays as it is."""
        if enable and triton_kernels.triton is None:
            raise ImportError("FastVisionEncoder.use_triton: Triton is not installed")
        self.triton = bool(enable)
        self.triton_fc1 = self.triton and self.quick_gelu and all(
            w["fc1"][0].data_ptr() % 16 == 0 for w in self.weights)
        # the fc1 kernel's grid size, looked up now rather than while tracing
        self._programs = multiprocessors(self.device) if self.triton_fc1 else None

    @torch.inference_mode()
    def capture(self, image_size, warmup=3):
        """Capture the batch-1 forward into a CUDA graph; returns None or the error (then eager is used;
        `strict`: raises `FastPathError`)."""
        try:
            self._static_in = torch.randn(1, 3, image_size, image_size, device=self.device, dtype=self.dtype)
            # _static_out: (1, 256, D) in the graph's pool, rewritten by every replay
            self._graph, self._static_out = capture_graph(
                lambda: self._run(self._static_in, self.stock_embed, self.stock_layer, self.layers), self.device,
                warmup, stream=self.warmup_stream)
            self.graph_error = None
        except Exception as error:  # noqa: BLE001 -- any failure: keep the eager forward (or raise, strict)
            self._graph = None
            self.graph_error = f"{type(error).__name__}: {error}"
            sync(self.device)
            if self.strict:
                raise FastPathError("vision cuda_graph", self.graph_error) from error
        return self.graph_error

    @property
    def graphed(self):
        return self._graph is not None
