"""Feature extraction at the decoder's speed: decoder processes, preprocessing on the device, a fed encoder.

    preprocess.py   DevicePreprocessor: uint8 frames (B, H, W, 3) -> CLIP pixel values on the device, batched
    decode.py       DecodeStream: the files decoded in worker processes, frames handed over in shared memory
    pipeline.py     run_pipeline: decoder processes -> bounded queue -> pinned copies -> encoder -> writer thread

`flash_vstream.extract_features --pipeline processes` (the default on CUDA) runs it.
"""
