"""Feature extraction at the decoder's speed: decoder processes, preprocessing on the device, a fed encoder.

    preprocess.py   DevicePreprocessor: uint8 frames (B, H, W, 3) -> CLIP pixel values on the device, batched
    decode.py       DecoderPool: decoder processes started once, frames handed over in pinned shared-memory slots
    pipeline.py     run_pipeline: decoder pool -> device copies -> preprocessing -> encoder -> writer and savers

`flash_vstream.extract_features --pipeline processes` (the default on CUDA) runs it.
"""
