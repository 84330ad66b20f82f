"""`FastVisionEncoder`: the CLIP patch features `CLIPVisionTower` returns, computed faster.

Used by the realtime session (one frame at a time: a CUDA graph) and by the benchmark (batched
extraction: regional `torch.compile`).
"""

import torch

from ..cuda_utils import capture_graph, sync


class FastVisionEncoder:
    """CLIP patch features exactly as `CLIPVisionTower` returns them (layer `select_layer`), faster.

    - Stops after the selected layer. The stock forward runs every layer and keeps every hidden state;
      with the released select_layer=-2 the last of ViT-L's 24 layers is wasted work.
    - `compile()`: regional torch.compile of the encoder layers (one compiled graph, shared by all
      layers and every batch size >= 2) for batched extraction; fuses the QuickGELU, LayerNorm and
      residual element-wise work the eager layer runs as separate memory-bound kernels.
    - `capture()`: a CUDA graph of the whole batch-1 forward for streaming: one launch instead of ~400
      small kernels, which is what a one-frame forward is limited by.
    """

    def __init__(self, vision_model, select_layer=-2, select_feature="patch"):
        core = getattr(vision_model, "vision_model", vision_model)  # 5.x: the CLIPVisionModel itself
        self.embeddings, self.pre_norm = core.embeddings, core.pre_layrnorm
        layers = core.encoder.layers
        keep = len(layers) + 1 + select_layer if select_layer < 0 else select_layer  # hidden_states[i] = after i layers
        self.layers = list(layers[:keep])
        self.skip_cls = select_feature == "patch"
        first = next(vision_model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.compiled_layers = None
        self.graph_error = None
        self._graph = None

    def _run(self, pixels, layers):
        hidden = self.pre_norm(self.embeddings(pixels.to(device=self.device, dtype=self.dtype)))  # (B, 1 + 256, D)
        for layer in layers:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out  # (B, 1 + 256, D)
        return hidden[:, 1:] if self.skip_cls else hidden  # (B, 256, D)

    @torch.inference_mode()
    def __call__(self, pixels):
        """(B, 3, S, S) normalised pixels -> (B, 256, D) features (a fresh tensor)."""
        if pixels.shape[0] == 1 and self._graph is not None:
            self._static_in.copy_(pixels)
            self._graph.replay()
            return self._static_out.clone()
        use_compiled = self.compiled_layers is not None and pixels.shape[0] > 1
        return self._run(pixels, self.compiled_layers if use_compiled else self.layers)

    def eager(self, pixels):
        with torch.inference_mode():
            return self._run(pixels, self.layers)

    def compile(self, mode=None):
        """Wrap each layer in torch.compile (compiles lazily, at the first batched call)."""
        self.compiled_layers = [torch.compile(layer, dynamic=True, mode=mode) for layer in self.layers]

    @torch.inference_mode()
    def capture(self, image_size, warmup=3):
        """Capture the batch-1 forward into a CUDA graph; returns None or the error (then eager is used)."""
        try:
            self._static_in = torch.randn(1, 3, image_size, image_size, device=self.device, dtype=self.dtype)
            # _static_out: (1, 256, D) in the graph's pool, rewritten by every replay
            self._graph, self._static_out = capture_graph(lambda: self._run(self._static_in, self.layers),
                                                          self.device, warmup)
        except Exception as error:  # noqa: BLE001 -- any failure: keep the eager forward
            self._graph = None
            self.graph_error = f"{type(error).__name__}: {error}"
            sync(self.device)
        return self.graph_error

    @property
    def graphed(self):
        return self._graph is not None
