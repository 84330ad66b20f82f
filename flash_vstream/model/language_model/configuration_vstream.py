"""`VStreamConfig`: every model and memory setting, with the released value as its default.

The released `config.json` names the STAR memory with the published code's words ("current",
"long", "Turing"). The code speaks the paper's words (spatial, temporal, abstract, retrieved);
`MEMORY_KEYS` below is the one place the two vocabularies meet.
"""

from transformers import LlamaConfig

# paper name -> released config key
MEMORY_KEYS = {
    "spatial_frames": "video_current_memory_length",      # N_spa
    "spatial_pool": "compress_size",                      # P_spa (also the buffer and retrieved side)
    "temporal_frames": "video_long_memory_length",        # N_tem
    "temporal_pool": "compress_long_memory_size",         # P_tem
    "abstract_frames": "video_Turing_memory_length",      # N_abs
    "abstract_pool": "compress_Turing_memory_size",       # P_abs
    "abstract_hidden_dim": "compress_Turing_hidden_dim",  # q/k width of Semantic Attention
    "abstract_update_ratio": "compress_Turing_update_ratio",  # alpha
    "retrieved_frames": "video_retrieved_memory_length",  # N_ret
    "buffer_frames": "video_buffer_length",               # N_buff
}

MEMORY_MODES = ("paper", "upstream")
COMPRESS_TYPES = ("mean",)
SAMPLE_TYPES = ("weighted_kmeans",)
PROJECTOR_TYPES_HINT = "linear, identity or mlp<N>x_gelu"
SELECT_FEATURES = ("patch", "cls_patch")
ASPECT_RATIOS = ("pad", "square")

# Keys written by the published code or its internal fork; accepted on load and otherwise ignored.
LEGACY_KEYS = (
    "mm_resampler_type",
    "freeze_mm_vision_resampler",
    "tune_mm_vision_resampler",
    "use_mm_proj",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "mm_projector_lr",
    "video_short_memory_length",
    "video_max_frames",
    "mm_use_4_vision_tokens",
)

PATCH_GRID = 16  # CLIP ViT-L/14 at 224 px: a 16x16 patch grid


class VStreamConfig(LlamaConfig):
    model_type = "vstream"

    def __init__(
        self,
        mm_vision_tower=None,
        mm_hidden_size=1024,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
        compress_type="mean",
        compress_size=8,
        compress_long_memory_size=4,
        compress_Turing_memory_size=1,
        compress_Turing_hidden_dim=32,
        compress_Turing_update_ratio=0.2,
        video_current_memory_length=1,
        video_long_memory_length=25,
        video_Turing_memory_length=25,
        video_retrieved_memory_length=3,
        video_buffer_length=300,
        video_sample_type="weighted_kmeans",
        video_fps=1.0,
        memory_mode="paper",
        **kwargs,
    ):
        for key in LEGACY_KEYS:
            kwargs.pop(key, None)
        self.mm_vision_tower = mm_vision_tower
        self.mm_hidden_size = mm_hidden_size
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_projector_type = mm_projector_type
        self.mm_use_im_start_end = mm_use_im_start_end
        self.mm_use_im_patch_token = mm_use_im_patch_token
        self.image_aspect_ratio = image_aspect_ratio
        self.tokenizer_model_max_length = tokenizer_model_max_length
        self.tokenizer_padding_side = tokenizer_padding_side
        self.compress_type = compress_type
        self.compress_size = compress_size
        self.compress_long_memory_size = compress_long_memory_size
        self.compress_Turing_memory_size = compress_Turing_memory_size
        self.compress_Turing_hidden_dim = compress_Turing_hidden_dim
        self.compress_Turing_update_ratio = compress_Turing_update_ratio
        self.video_current_memory_length = video_current_memory_length
        self.video_long_memory_length = video_long_memory_length
        self.video_Turing_memory_length = video_Turing_memory_length
        self.video_retrieved_memory_length = video_retrieved_memory_length
        self.video_buffer_length = video_buffer_length
        self.video_sample_type = video_sample_type
        self.video_fps = video_fps
        self.memory_mode = memory_mode
        super().__init__(**kwargs)
        self.validate_vstream()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # A saved config without `memory_mode` was written by the published code (the released
        # checkpoint): its weights expect the published memory behaviour.
        if "memory_mode" not in config_dict:
            config_dict = {**config_dict, "memory_mode": "upstream"}
        return super().from_dict(config_dict, **kwargs)

    def validate_vstream(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"VStreamConfig.{name}={value!r}: expected one of {allowed}")

        check("memory_mode", self.memory_mode, MEMORY_MODES)
        check("compress_type", self.compress_type, COMPRESS_TYPES)
        check("video_sample_type", self.video_sample_type, SAMPLE_TYPES)
        check("mm_vision_select_feature", self.mm_vision_select_feature, SELECT_FEATURES)
        check("image_aspect_ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        check("tokenizer_padding_side", self.tokenizer_padding_side, ("left", "right"))
        for pool_key in ("compress_size", "compress_long_memory_size", "compress_Turing_memory_size"):
            side = getattr(self, pool_key)
            if not isinstance(side, int) or side < 1 or PATCH_GRID % side:
                raise ValueError(f"VStreamConfig.{pool_key}={side!r}: must divide the {PATCH_GRID}x{PATCH_GRID} patch grid")
        for length_key in ("video_current_memory_length", "video_long_memory_length",
                           "video_Turing_memory_length", "compress_Turing_hidden_dim"):
            if int(getattr(self, length_key)) < 1:
                raise ValueError(f"VStreamConfig.{length_key} must be >= 1")
        if int(self.video_retrieved_memory_length) < 0:
            raise ValueError("VStreamConfig.video_retrieved_memory_length must be >= 0")
        if self.video_buffer_length < self.video_current_memory_length + self.video_retrieved_memory_length:
            raise ValueError("VStreamConfig.video_buffer_length must hold the spatial and retrieved frames")
        if not 0.0 <= self.compress_Turing_update_ratio <= 1.0:
            raise ValueError("VStreamConfig.compress_Turing_update_ratio must lie in [0, 1]")
        if self.video_fps <= 0:
            raise ValueError("VStreamConfig.video_fps must be > 0")


def _paper_alias(released_key):
    return property(lambda self: getattr(self, released_key), doc=f"Paper name for `{released_key}`.")


for _paper, _released in MEMORY_KEYS.items():
    setattr(VStreamConfig, _paper, _paper_alias(_released))
