"""The quantized weights' error and kernels at the 7B shape (what the realtime benchmark's quantized rows
do not show):

    python -m benchmarks.realtime.quantization --output F.json [--device cuda] [--layers 32] [--torchao]

- error: a Vicuna-7B-shaped model with random bf16 weights answers one 128-token prompt in bf16 and with
  its LLM quantized to int8 and int4 (model/quantization.py): the relative error of the hidden state after
  each layer (accumulated through the quantized stack) and of the logits, the share of positions whose
  top-1 token agrees, and each projection kind's weight error.
- kernels: every 7B product at batch 1 (q/k/v fused, o, gate/up fused, down, LM head): bf16 `gemv`,
  int8 / int4 `gemv`, and (--torchao, when it imports) torchao's int8 / int4 weight-only layers; each
  timed as a CUDA graph of 20 calls, with the GB/s of the weight bytes read. Then the 32-token product of
  a question after the kept prefix: bf16 F.linear against `qmatmul`.

Random weights: their quantization error is that of Gaussian weights, not of trained ones (outliers).
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from benchmarks.common import environment, log
from benchmarks.realtime.build import vicuna_7b_config
from flash_vstream.model.quantization import LLAMA_PROJECTIONS, quantize_model, quantize_weight
from flash_vstream.runtime import triton_kernels as tk
from flash_vstream.utils.files import write_json

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down_proj": (4096, 11008),
          "lm_head": (32000, 4096)}


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def graph_us(fn, calls=20, repeats=5):
    """Microseconds per call of `fn()` captured `calls` times into one CUDA graph (median of repeats)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    return round(sorted(times)[len(times) // 2], 2)


def error_section(device, layers, seed=0):
    config = vicuna_7b_config()
    config.num_hidden_layers = layers
    from flash_vstream.model import VStreamLlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = VStreamLlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    ids = torch.randint(3, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.inference_mode():
        ref = model(ids, output_hidden_states=True)
    out = {"layers": layers, "prompt_tokens": 128, "schemes": {}}
    for scheme in ("int8", "int4"):
        quantized = quantize_model(copy.deepcopy(model), scheme)
        with torch.inference_mode():
            got = quantized(ids, output_hidden_states=True)
        hidden = [round(rel_err(g, r), 5) for g, r in zip(got.hidden_states[1:], ref.hidden_states[1:])]
        weights = {}
        for path in LLAMA_PROJECTIONS:
            w = model.get_model().layers[0].get_submodule(path).weight
            weights[path.split(".")[-1]] = round(rel_err(quantize_weight(w, 8 if scheme == "int8" else 4)
                                                         .dequantize(torch.float32), w), 5)
        out["schemes"][scheme] = {
            "hidden_rel_err_after_layer": hidden, "logits_rel_err": round(rel_err(got.logits, ref.logits), 5),
            "top1_agreement": float((got.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()),
            "layer0_weight_rel_err": weights}
        log(f"  {scheme}: logits rel err {out['schemes'][scheme]['logits_rel_err']}, top-1 agreement "
            f"{out['schemes'][scheme]['top1_agreement']:.3f}, after layer 1 / last {hidden[0]} / {hidden[-1]}")
        del quantized, got
        torch.cuda.empty_cache()
    return out


def torchao_layer(weight, scheme):
    """A torchao weight-only quantized nn.Linear over `weight` (raises when torchao cannot)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    if scheme == "int8":
        config = Int8WeightOnlyConfig()
    else:
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    quantize_(linear, config)
    return linear


def kernel_section(device, use_torchao):
    rows, notes = [], []
    try:
        import torchao

        ao_version = torchao.__version__ if use_torchao else None
    except Exception as error:  # noqa: BLE001 -- optional: recorded
        ao_version, use_torchao = None, False
        notes.append(f"torchao does not import: {type(error).__name__}: {str(error)[:300]}")
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(n + k)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(k, device=device, dtype=torch.bfloat16)
        row = {"product": name, "n": n, "k": k}
        bf16_bytes = n * k * 2
        row["bf16_gemv_us"] = graph_us(lambda: tk.gemv(x, w))
        if name == "gate_up":
            row["bf16_gemv_paired_us"] = graph_us(lambda: tk.gemv(x, w, paired=True))
        row["bf16_cublas_us"] = graph_us(lambda: F.linear(x[None], w))
        for scheme, bits in (("int8", 8), ("int4", 4)):
            q = quantize_weight(w, bits)
            byte_count = q.qweight.numel() + q.scales.numel() * q.scales.element_size() * (2 if bits == 4 else 1)
            ref = q.dequantize(torch.float32) @ x.float()
            got = tk.gemv(x, q.qweight, scales=q.scales, zeros=q.zeros, group_size=q.group_size)
            row[f"{scheme}_gemv_rel_err_vs_dequantized"] = round(rel_err(got, ref), 6)
            row[f"{scheme}_gemv_us"] = graph_us(
                lambda: tk.gemv(x, q.qweight, scales=q.scales, zeros=q.zeros, group_size=q.group_size))
            row[f"{scheme}_gemv_gb_per_s"] = round(byte_count / row[f"{scheme}_gemv_us"] / 1e3, 1)
            # other tilings: int8 (BLOCK_N, BLOCK_K, warps), int4 (BLOCK_N, groups unrolled, warps)
            # other tilings: int8 (BLOCK_N, BLOCK_K, warps, stages), int4 (BLOCK_N, groups a step, warps, stages)
            sweep = {8: ((4, 1024, 4, 1), (8, 1024, 4, 1), (16, 512, 8, 1), (4, 256, 8, 1), (2, 1024, 4, 2),
                         (4, 1024, 4, 2), (4, 1024, 4, 3), (8, 1024, 4, 2), (8, 512, 4, 2), (16, 512, 8, 2),
                         (4, 256, 8, 2), (8, 256, 8, 2), (4, 512, 4, 2), (2, 256, 4, 1), (16, 256, 8, 1),
                         (8, 256, 4, 2), (4, 2048, 8, 1)),
                     4: ((16, 8, 4, 1), (16, 8, 4, 2), (8, 8, 2, 1), (8, 8, 2, 2), (16, 4, 2, 1), (16, 4, 4, 1),
                         (8, 8, 4, 1), (16, 8, 8, 1), (32, 8, 8, 1), (8, 4, 1, 1), (8, 4, 1, 2), (16, 2, 2, 1),
                         (32, 4, 4, 1), (4, 8, 1, 1), (8, 16, 4, 1))}
            # gate/up also paired: the n / 2 outputs silu(gate) * up, what the decode step runs
            for paired, config in [(False, c) for c in sweep[bits]] + [(True, c) for c in (None, *sweep[bits])
                                                                      if name == "gate_up"]:
                key = f"{scheme}_gemv{'_paired' if paired else ''}_us" + (f"_{'x'.join(map(str, config))}"
                                                                         if config else "")
                try:
                    row[key] = graph_us(lambda: tk.gemv(x, q.qweight, scales=q.scales, zeros=q.zeros,
                                                        group_size=q.group_size, config=config, paired=paired))
                except Exception as error:  # noqa: BLE001 -- a tiling that does not compile: recorded
                    row[key] = f"{type(error).__name__}: {str(error)[:200]}"
            x32 = torch.randn(32, k, device=device, dtype=torch.bfloat16)
            row[f"{scheme}_qmatmul32_us"] = graph_us(
                lambda: tk.qmatmul(x32, q.qweight, q.scales, q.zeros, q.group_size), calls=10)
            # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the 32-token product
            for config in ((32, 32, 128, 4, 3), (32, 128, 128, 4, 3), (32, 128, 128, 8, 3), (16, 64, 128, 4, 4),
                           (32, 64, 128, 4, 1), (16, 128, 128, 4, 2), (32, 64, 256, 4, 3), (32, 256, 64, 8, 3)):
                key = f"{scheme}_qmatmul32_us_{'x'.join(map(str, config))}"
                try:
                    row[key] = graph_us(lambda: tk.qmatmul(x32, q.qweight, q.scales, q.zeros, q.group_size,
                                                           config=config), calls=10)
                except Exception as error:  # noqa: BLE001 -- a tiling that does not compile: recorded
                    row[key] = f"{type(error).__name__}: {str(error)[:200]}"
            row[f"{scheme}_qmatmul32_rel_err"] = round(rel_err(tk.qmatmul(x32, q.qweight, q.scales, q.zeros,
                                                                          q.group_size),
                                                               x32.float() @ q.dequantize(torch.float32).T), 6)
            if use_torchao:
                try:
                    layer = torchao_layer(w, scheme)
                    row[f"torchao_{scheme}_rel_err_vs_bf16"] = round(rel_err(layer(x[None])[0], w.float() @ x.float()), 6)
                    row[f"torchao_{scheme}_us"] = graph_us(lambda: layer(x[None]))
                except Exception as error:  # noqa: BLE001 -- optional: recorded
                    row[f"torchao_{scheme}_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        row["bf16_linear32_us"] = graph_us(lambda: F.linear(x32, w), calls=10)
        row["bf16_gb_per_s"] = round(bf16_bytes / row["bf16_gemv_us"] / 1e3, 1)
        log(f"  {name} ({n}x{k}): " + ", ".join(f"{key} {v}" for key, v in row.items()
                                                 if key.endswith("_us") and not isinstance(v, str)))
        rows.append(row)
    return {"rows": rows, "torchao": ao_version, "notes": notes}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.realtime.quantization", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the error model (7B: 32)")
    p.add_argument("--torchao", action="store_true", help="also time torchao's weight-only layers")
    p.add_argument("--skip", default="", help="error,kernels")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    report = {"meta": environment(device)}
    started = time.perf_counter()
    for name, run in (("kernels", lambda: kernel_section(device, args.torchao)),
                      ("error", lambda: error_section(device, args.layers))):
        if name in args.skip.split(","):
            continue
        if device.type != "cuda" and name == "kernels":
            report[name] = {"status": "skipped", "reason": "CUDA graphs time the kernels: not a CUDA device"}
            continue
        log(f"[{name}]")
        try:
            report[name] = {"status": "ok", **run()}
        except Exception as error:  # noqa: BLE001 -- keep what the other part measured
            report[name] = {"status": "failed", "error": f"{type(error).__name__}: {str(error)[:1000]}"}
            log(f"[{name}] FAILED: {report[name]['error']}")
        report["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
        write_json(args.output, report, indent=2)
    return 0 if all(v.get("status") != "failed" for k, v in report.items() if k != "meta") else 1


if __name__ == "__main__":
    raise SystemExit(main())
