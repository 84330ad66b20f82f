"""CLIP preprocessing in torch from uint8 frames: what `mm_utils.process_images` does with PIL, batched.

Pad to a square with the processor's mean colour (as `expand2square`), resize the shortest edge with
antialiased bicubic (PIL's BICUBIC filter; the result is rounded to uint8 as PIL's is), centre crop,
rescale and normalise. The same code runs on CPU and CUDA; tests/test_extract_pipeline.py states how
close it stays to the processor's own path.
"""

import torch
import torch.nn.functional as F

_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample codes CLIP processors use


def _field(size, key):
    """A size entry of a processor: a dict ({"shortest_edge": 224}) or transformers' SizeDict."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def resize_output_size(height, width, shortest_edge):
    """(h, w) with the shorter side `shortest_edge` and the aspect kept (truncated, as transformers)."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


class DevicePreprocessor:
    """uint8 frames (B, H, W, 3) RGB, any device -> pixel values (B, 3, S, S) in `dtype` on that device."""

    def __init__(self, image_processor, image_aspect_ratio="pad", dtype=torch.float32):
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        p = image_processor
        self.pad = image_aspect_ratio == "pad"
        self.mean_rgb = [int(round(x * 255)) for x in p.image_mean]  # expand2square's background
        self.shortest_edge = _field(p.size, "shortest_edge") or _field(p.size, "height")
        self.crop = (_field(p.crop_size, "height"), _field(p.crop_size, "width")) if p.do_center_crop else None
        resample = int(getattr(p.resample, "value", p.resample))
        if resample not in _MODES:
            raise ValueError(f"resample {p.resample!r} is not one a CLIP processor uses (bilinear, bicubic)")
        self.mode = _MODES[resample]
        self.scale = float(p.rescale_factor) if p.do_rescale else 1.0
        self.mean = torch.tensor(p.image_mean if p.do_normalize else [0.0] * 3, dtype=torch.float32)
        self.std = torch.tensor(p.image_std if p.do_normalize else [1.0] * 3, dtype=torch.float32)
        self.dtype = dtype
        self._constants = {}  # device -> (fill (1, 3, 1, 1) uint8, mean, std (1, 3, 1, 1)): no copy per batch

    def constants(self, device):
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.mean_rgb, dtype=torch.uint8, device=device).view(1, 3, 1, 1),
                                       self.mean.to(device).view(1, 3, 1, 1), self.std.to(device).view(1, 3, 1, 1))
        return self._constants[device]

    def pad_square(self, x):
        """(B, 3, H, W) uint8 -> (B, 3, L, L), L = max(H, W), centred on the mean colour."""
        b, _, h, w = x.shape
        if h == w:
            return x
        side = max(h, w)
        out = torch.empty((b, 3, side, side), dtype=x.dtype, device=x.device)
        out[:] = self.constants(x.device)[0]
        top, left = (side - h) // 2, (side - w) // 2
        out[:, :, top:top + h, left:left + w] = x
        return out

    def __call__(self, frames):
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (B, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
        x = frames.permute(0, 3, 1, 2)  # (B, 3, H, W)
        if self.pad:
            x = self.pad_square(x)  # (B, 3, L, L)
        h, w = x.shape[-2:]
        size = resize_output_size(h, w, self.shortest_edge)
        x = x.float()
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)  # PIL resizes uint8 to uint8
        if self.crop is not None:
            ch, cw = self.crop
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[:, :, top:top + ch, left:left + cw]  # (B, 3, S, S)
        _, mean, std = self.constants(x.device)
        return ((x * self.scale - mean) / std).to(self.dtype).contiguous()
