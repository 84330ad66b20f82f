from .clip_encoder import CLIPVisionTower


def build_vision_tower(config, delay_load=False):
    name = config.mm_vision_tower
    if name is None:
        raise ValueError("config.mm_vision_tower is not set: give a CLIP checkpoint path (--vision_tower)")
    return CLIPVisionTower(name, select_layer=config.mm_vision_select_layer,
                           select_feature=config.mm_vision_select_feature, delay_load=delay_load)
