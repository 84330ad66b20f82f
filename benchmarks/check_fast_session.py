"""Check that the realtime fast path answers exactly as the stock path (a check, not a benchmark).

Builds a tiny random Flash-VStream in fp32 (nothing downloaded), streams random frames into two
`StreamSession`s -- the fast path, strict (FastVisionEncoder, GreedyDecoder with the kept prefix and, on
CUDA, its CUDA graphs) and `fast=False` (CLIPVisionTower + `model.generate`) -- and compares the memory
snapshots and the answers every few frames. Exit 1 when anything differs.

    python -m benchmarks.check_fast_session                 # CUDA when available
    python -m benchmarks.check_fast_session --device cpu --frames 10
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from flash_vstream.demo.tiny import TINY_CORPUS, build_tiny_clip, build_tiny_vstream, train_tokenizer
from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.runtime.options import FastPathOptions
from flash_vstream.serve.session import StreamSession


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--ask-every", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as root:  # the tiny checkpoint, written and loaded like a real one
        clip = build_tiny_clip(os.path.join(root, "clip"))
        tokenizer_dir = train_tokenizer(TINY_CORPUS * 20, os.path.join(root, "tokenizer"), vocab_size=300)
        path = build_tiny_vstream(os.path.join(root, "model"), tokenizer_dir, clip)
        tokenizer, model, image_processor, _ = load_pretrained_model(path, device=args.device)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(args.frames)]
    common = dict(max_new_tokens=args.max_new_tokens)
    stock = StreamSession(model, tokenizer, image_processor, fast=False, **common)
    # strict: a fast-path part that cannot run raises, so the check never passes on a fallback
    options = FastPathOptions.from_cli("on", compile_decode=False, strict=True)
    fast = StreamSession(model, tokenizer, image_processor, fast_path=options, **common).warm_up()
    described = fast.fast_path.describe()
    print(f"fast path: {described['summary']}; decode {described['decode']}, vision {described['vision']}")
    failures = 0
    for i, frame in enumerate(frames):
        stock.add_frame(frame, float(i))
        fast.add_frame(frame, float(i))
        if (i + 1) % args.ask_every:
            continue
        a, b = stock.ask("what is in the video?"), fast.ask("what is in the video?")
        same_memory = torch.equal(stock.snapshot().tokens, fast.snapshot().tokens)
        same_answer = (a.text, a.new_tokens) == (b.text, b.new_tokens)
        failures += not (same_memory and same_answer)
        print(f"frame {i + 1:>3}: memory equal {same_memory}, answer equal {same_answer}, first token "
              f"{1e3 * a.ttft_s:.1f} ms stock / {1e3 * b.ttft_s:.1f} ms fast")
    print("OK" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
