"""The multimodal half of the model, in data-flow order:

frames (T, 3, H, W) --CLIP--> features (T, 256, D) --STAR memory--> tokens (N <= 681, D)
  --mm_projector--> (N, hidden) --scattered into the expanded <image> positions of the text.
"""

import torch

from ..constants import IMAGE_TOKEN_INDEX
from ..mm_utils import expand_image_tokens, process_images
from .memory import SemanticAttention, STARMemory, abstract_memory
from .language_model.packed import per_sample_counts
from .multimodal_encoder.builder import build_vision_tower
from .multimodal_projector.builder import build_vision_projector


class VStreamMetaModel:
    """Mixin for the LLaMA backbone: vision tower, projector and Semantic Attention.

    Attribute names reach the state dict and keep the released names (`mm_projector`,
    `attention_model`) so released checkpoints load key for key.
    """

    def __init__(self, config):
        super().__init__(config)
        # The tower is always delay-loaded: `post_init` would otherwise re-initialise its weights,
        # and the released checkpoint does not contain them. `load_vision_tower()` reads it from disk.
        self.vision_tower = build_vision_tower(config, delay_load=True) if config.mm_vision_tower else None
        self.mm_projector = build_vision_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        self.attention_model = SemanticAttention(config.mm_hidden_size, config.compress_Turing_hidden_dim)

    def get_vision_tower(self):
        return self.vision_tower

    def mm_projector_dtype(self):
        params = list(self.mm_projector.parameters())
        return params[0].dtype if params else self.embed_tokens.weight.dtype

    def load_vision_tower(self, vision_tower=None, device=None, dtype=None):
        """Build (if needed) and load the CLIP tower from a local path; returns it."""
        if vision_tower is not None and vision_tower != self.config.mm_vision_tower:
            self.config.mm_vision_tower = vision_tower
            self.vision_tower = None
        if self.vision_tower is None:
            self.vision_tower = build_vision_tower(self.config, delay_load=True)
        self.vision_tower.load_model()
        if self.vision_tower.hidden_size != self.config.mm_hidden_size:
            raise ValueError(
                f"vision tower width {self.vision_tower.hidden_size} != config.mm_hidden_size "
                f"{self.config.mm_hidden_size}")
        self.vision_tower.to(device=device, dtype=dtype)
        return self.vision_tower


class VStreamMetaForCausalLM:
    """Mixin for the causal LM: turns frames or features into spliced input embeddings."""

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    # --- frames -> features ------------------------------------------------------------------
    def encode_images(self, images):
        """list of (T_i, 3, H, W) -> list of (T_i, 256, D) CLIP patch features."""
        tower = self.get_vision_tower()
        if tower is None or not tower.is_loaded:
            raise RuntimeError(
                f"raw frames need the vision tower {self.config.mm_vision_tower!r}, which is not loaded (not found "
                "locally?): pass features= instead, or load it with model.get_model().load_vision_tower()")
        lengths = [len(x) for x in images]
        features = tower(torch.cat(list(images)))  # (sum T_i, 256, D)
        return list(features.split(lengths))

    def encode_frames(self, frames, image_processor):
        """uint8 (H, W, 3) frames (or PIL images) -> (T, 256, D), preprocessed as the config says."""
        pixels = process_images(frames, image_processor, self.config.image_aspect_ratio)  # (T, 3, S, S)
        return self.encode_images([pixels])[0]  # (T, 256, D)

    # --- features -> memory tokens ------------------------------------------------------------
    def build_memory(self, features, seed=0):
        """list of (T_i, 256, D) -> list of (N_i, D): one STAR memory per sample, one chunk each.

        The same `STARMemory.update` serves streaming (chunks of one frame); here a whole clip is
        one chunk, as in training and offline evaluation.
        """
        attention = self.get_model().attention_model
        tokens = []
        for clip in features:
            memory = STARMemory(self.config, attention_model=attention, seed=seed)
            memory.update(clip.to(self.get_model().mm_projector_dtype()))
            tokens.append(memory.read())  # (N_i, D)
        return tokens

    def finish_memory(self, frozen_memory):
        """list of `memory.frozen_memory` dicts (built by the data loader's workers) -> list of (N_i, D).

        Only the Semantic Attention runs here, batched over the samples: the training path with
        the memory build off the step's critical path (`--memory_build dataloader`).
        """
        dtype = self.get_model().mm_projector_dtype()
        frozen = [{k: v.to(dtype) if k == "tokens" else v for k, v in f.items()} for f in frozen_memory]
        return abstract_memory(frozen, self.get_model().attention_model, self.config)

    def memory_tokens(self, features=None, images=None, memory=None, frozen_memory=None):
        """Exactly one of features / images / memory (precomputed tokens) / frozen_memory -> list of (N_i, D)."""
        given = [x is not None for x in (features, images, memory, frozen_memory)]
        if sum(given) > 1:
            raise ValueError("pass only one of features=, images=, memory=, frozen_memory=")
        if memory is not None:
            return list(memory)
        if frozen_memory is not None:
            return self.finish_memory(frozen_memory)
        if images is not None:
            features = self.encode_images(images)
        if features is not None:
            return self.build_memory(features)
        return None

    # --- memory tokens -> spliced embeddings --------------------------------------------------
    def embed_with_memory(self, input_ids, memory_tokens, packed_position_ids=None):
        """Embed `input_ids` (B, L) and scatter the projected memory into its -200 positions.

        Each sample must already hold as many placeholders as it has memory tokens
        (`expand_image_tokens`); samples are matched in order, text-only ones hold none. A sample
        is a row, or with `packed_position_ids` (B, L) (packed rows) a run of restarting positions.
        """
        model = self.get_model()
        is_memory = input_ids == IMAGE_TOKEN_INDEX  # (B, L)
        embeds = model.embed_tokens(input_ids.masked_fill(is_memory, 0))  # (B, L, hidden)
        counts = per_sample_counts(is_memory, packed_position_ids)
        tokens = [] if memory_tokens is None else list(memory_tokens)
        expected = [len(t) for t in tokens]
        placeholder_rows = [c for c in counts if c]
        if placeholder_rows != expected:
            raise ValueError(
                f"memory/placeholder mismatch: the samples hold {counts} <image> positions but the memory has "
                f"{expected} tokens per sample; expand prompts with expand_image_tokens()")
        if tokens:
            flat = torch.cat(tokens).to(device=embeds.device, dtype=model.mm_projector_dtype())  # (sum N, D)
            projected = model.mm_projector(flat).to(embeds.dtype)  # (sum N, hidden)
            embeds = embeds.masked_scatter(is_memory.unsqueeze(-1), projected)
        if self.training:
            embeds = embeds + 0.0 * self._idle_multimodal_output().to(embeds.dtype)
        return embeds

    def _idle_multimodal_output(self):
        """A zero-weighted output of every multimodal parameter, so that DDP and ZeRO see a grad for
        each (text-only batches, clips too short to reach the Semantic Attention, the unused
        v/out/out_ln). The modules are called, not their tensors read: ZeRO-3 gathers on call."""
        model = self.get_model()
        attention = model.attention_model
        probe = torch.zeros(1, self.config.mm_hidden_size, device=model.embed_tokens.weight.device,
                            dtype=model.mm_projector_dtype())  # (1, D)
        outputs = (model.mm_projector(probe), attention.q_proj(probe), attention.k_proj(probe),
                   attention.out_proj(attention.v_proj(probe)), attention.out_ln(probe))
        return sum(out.sum() for out in outputs)

    def expand_for_generation(self, input_ids, memory_tokens, attention_mask=None, pad_token_id=0):
        """Expand each row's single `<image>` to its memory size; re-pad on the left.

        (B, L) ids with one placeholder per row (padding marked by `attention_mask`) ->
        (B, L') ids and mask. Generation runs left-padded so every row ends at the same column.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows, token_iter = [], iter(memory_tokens or [])
        for ids, keep in zip(input_ids, attention_mask.bool()):
            ids = ids[keep]
            if (ids == IMAGE_TOKEN_INDEX).any():
                ids = expand_image_tokens(ids, len(next(token_iter)))
            rows.append(ids)
        width = max(len(r) for r in rows)
        out_ids = input_ids.new_full((len(rows), width), pad_token_id)
        out_mask = torch.zeros_like(out_ids)
        for i, r in enumerate(rows):
            out_ids[i, width - len(r):] = r
            out_mask[i, width - len(r):] = 1
        return out_ids, out_mask

