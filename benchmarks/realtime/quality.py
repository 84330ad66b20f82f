"""Answer quality of the quantized LLM against full precision, on the demo's trained model (CPU):

    python -m benchmarks.realtime.quality --output-dir DIR [--demo-output demo_output] [--device cpu]

The held-out set of `bash scripts/demo.sh` goes through the real inference driver three times (full
precision, `--load-8bit`, `--load-4bit`; greedy, the demo's settings) and is scored by exact match as the
demo scores it. DIR/quality.json: per scheme the exact-match accuracy (all and per question family),
the share of answers identical to the full-precision ones, and the shift in accuracy.
"""

import argparse
import json
import os

from flash_vstream.demo.run_demo import demo_paths, evaluate
from flash_vstream.utils.files import write_json

SCHEMES = {"full": (), "int8": ("--load-8bit",), "int4": ("--load-4bit",)}


def run_scheme(paths, out, device, flags):
    out = evaluate(paths, device, " ".join(flags) or "full precision", extra=flags, out=out)
    with open(os.path.join(out, "exact", "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "pred.jsonl")) as f:
        preds = {r["id"]: r["pred"] for r in map(json.loads, f) if "pred" in r}
    return results, preds


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.realtime.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--demo-output", default="demo_output", help="the folder `bash scripts/demo.sh` wrote")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    paths = demo_paths(args.demo_output)
    if not os.path.isdir(paths["stage2"]):
        p.error(f"{paths['stage2']}: no trained demo model (run bash scripts/demo.sh first)")
    report = {"model": paths["stage2"], "device": args.device, "questions": None, "schemes": {}}
    reference = None
    for name, flags in SCHEMES.items():
        results, preds = run_scheme(paths, os.path.join(args.output_dir, name), args.device, flags)
        entry = {"accuracy": results["accuracy"], "judged": results["judged"],
                 "by_type": {k: v["accuracy"] for k, v in results["by_type"].items()}}
        if reference is None:
            reference, report["questions"] = preds, len(preds)
        else:
            same = sum(preds.get(k) == v for k, v in reference.items())
            entry.update(identical_to_full=same, identical_share=round(same / len(reference), 4),
                         accuracy_points_vs_full=round(100 * (results["accuracy"] - report["schemes"]["full"]["accuracy"]), 2))
        report["schemes"][name] = entry
        print(f"{name}: accuracy {entry['accuracy']:.4f}" + (f", identical to full precision {entry['identical_share']:.3f}"
                                                            if "identical_share" in entry else ""), flush=True)
    write_json(os.path.join(args.output_dir, "quality.json"), report, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
