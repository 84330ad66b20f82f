"""Entry point used by the scripts: `train()` with flash-attn 2 when it is installed, else SDPA
(packed rows under a block-diagonal mask; `--attn_implementation torch_varlen` asks for PyTorch's varlen kernel).

The published entry monkey-patched LLaMA attention; transformers selects the kernel through
`attn_implementation`, so this only picks the default.
"""

import sys

from flash_vstream.train.packing import default_attn_implementation
from flash_vstream.train.train import finish_distributed, train  # absolute: the DeepSpeed launcher runs this file as a script

if __name__ == "__main__":
    argv = sys.argv[1:]
    choice = default_attn_implementation()
    if "--attn_implementation" not in argv and choice is not None:
        argv += ["--attn_implementation", choice]
    train(argv)
    finish_distributed()
