"""The frozen CLIP ViT that turns frames into patch features."""

import os

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

HUB_TO_LOCAL = {"openai/clip-vit-large-patch14": os.path.join("ckpt", "clip-vit-large-patch14")}


def resolve_vision_tower_path(name):
    """Map the released hub name to the local `ckpt/` copy when it exists (nothing is downloaded)."""
    local = HUB_TO_LOCAL.get(name)
    if local is not None and os.path.isdir(local):
        return local
    return name


class CLIPVisionTower(nn.Module):
    """CLIP vision encoder: frames (T, 3, H, W) -> patch features (T, 256, 1024) for ViT-L/14-224.

    `delay_load=True` keeps only the config, so a checkpoint without vision weights (the released
    one) can be built and its weights loaded before the tower itself is read from disk.
    """

    def __init__(self, vision_tower, select_layer=-2, select_feature="patch", delay_load=False):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.is_loaded = False
        self.cfg_only = None
        if not delay_load:
            self.load_model()
        elif os.path.isdir(resolve_vision_tower_path(vision_tower)):
            self.cfg_only = CLIPVisionConfig.from_pretrained(self._local_path(), local_files_only=True)
        # else: a features-only model (evaluation on pre-extracted features) never needs the tower;
        # `load_model()` raises a clear error if frames are ever given.

    def _local_path(self):
        path = resolve_vision_tower_path(self.vision_tower_name)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"vision tower {self.vision_tower_name!r} not found locally (looked at {path!r}); "
                "put CLIP ViT-L/14 in ckpt/clip-vit-large-patch14 or pass a local path")
        return path

    def load_model(self, device_map=None):
        if self.is_loaded:
            return
        path = self._local_path()
        self.image_processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.vision_tower = CLIPVisionModel.from_pretrained(path, local_files_only=True, device_map=device_map)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @torch.no_grad()
    def forward(self, images):
        # images: (T, 3, H, W) -> (T, 256, D) patch features of layer `select_layer`
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]  # (T, 1 + 256, D)
        if self.select_feature == "patch":
            features = features[:, 1:]  # (T, 256, D)
        return features

    @property
    def config(self):
        if self.is_loaded:
            return self.vision_tower.config
        if self.cfg_only is None:
            self._local_path()  # raises: the tower is not available locally
        return self.cfg_only

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_patches(self):
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device
