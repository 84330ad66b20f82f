"""Merge a stage-2 LoRA run into a full Flash-VStream checkpoint folder.

    python scripts/merge_lora_weights.py --model-path checkpoints-finetune/X-lora \
        --model-base ckpt/vicuna-7b-v1.5 --save-model-path checkpoints-finetune/X-merged
"""

import argparse

from flash_vstream.model.builder import load_pretrained_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="LoRA output folder (adapter_config.json)")
    parser.add_argument("--model-base", required=True, help="the LLM the LoRA run started from")
    parser.add_argument("--save-model-path", required=True)
    args = parser.parse_args(argv)
    tokenizer, model, _, _ = load_pretrained_model(args.model_path, args.model_base, device="cpu")
    model.save_pretrained(args.save_model_path)
    tokenizer.save_pretrained(args.save_model_path)
    print(f"merged {args.model_path} + {args.model_base} -> {args.save_model_path}")


if __name__ == "__main__":
    main()
