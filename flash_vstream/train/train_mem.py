"""Entry point used by the scripts: `train()` with flash-attn 2 when it is installed, else SDPA.

The published entry monkey-patched LLaMA attention; transformers selects the kernel through
`attn_implementation`, so this only picks the default.
"""

import importlib.util
import sys

from flash_vstream.train.train import train  # absolute: the DeepSpeed launcher runs this file as a script

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--attn_implementation" not in argv and importlib.util.find_spec("flash_attn") is not None:
        argv += ["--attn_implementation", "flash_attention_2"]
    train(argv)
