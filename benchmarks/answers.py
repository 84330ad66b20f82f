"""Batched answers (continuous batching) against answering one question at a time, in the same run.

    python -m benchmarks.answers --output answers.json                       # 7B-shaped, random bf16 weights, cuda
    python -m benchmarks.answers --output /tmp/a.json --preset tiny --device cpu   # smoke run

K questions (K = 1, 4, 16, 64 by default) arrive at once, each from its own session: its own memory
snapshot (681 random tokens of CLIP width) and its own prompt (~30 text tokens around `<image>`), 64
answer tokens each (EOS ignored). Two ways to answer them:

- batched: one `BatchDecoder` (runtime/batch_decoder.py) of K slots; every question's memory is
  projected and prefilled on its question path (the joiners of a step prefill together, within the
  prefill-token budget), then every running answer gets one token per decode step (a CUDA graph per
  shape on CUDA, captured in an untimed warm-up round of the same K);
- one at a time (today's design): the fast path's `GreedyDecoder`, each question after the one before.
  As a session runs it, the prompt prefix (system text + memory) is refreshed at ingest, off the question
  path: its time is measured (`prefix_ms`) but not counted in the questions' waits; a question costs its
  own ~30 tokens of prefill plus the decode steps.

For each: aggregate answer tokens/s (K x 64 / the time until the last answer is done), per-question time
to first token and answer time (p50 / p99, counted from when all K arrived), the KV cache bytes and the
peak GPU memory. K = 1 also gives the batch's first token against the fast path's (the engine keeps the
fast path when one question runs). Prints a table and writes JSON.
"""

import argparse
import time

import torch

from benchmarks.common import DTYPES, environment, log, peak_gb, reset_peak
from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.runtime.batch_decoder import BatchDecoder, BatchRequest
from flash_vstream.runtime.cuda_utils import free_memory, sync
from flash_vstream.runtime.decoder import prefix_through_image, round_up
from flash_vstream.runtime.fast_path import FastPath
from flash_vstream.runtime.options import FastPathOptions
from flash_vstream.utils.files import write_json
from flash_vstream.utils.stats import summary

PREFIX_TEXT = 6  # text tokens before <image> (BOS and the turn's opening); the question follows it
PRESETS = {
    "7b": dict(ks=(1, 4, 16, 64), memory_tokens=681, prompt_tokens=30, answer_tokens=64, eager_ks=(16,)),
    "tiny": dict(ks=(1, 2, 4), memory_tokens=81, prompt_tokens=12, answer_tokens=8, eager_ks=(2,)),
}


def build_model(preset, device, dtype, seed):
    """Random weights of the preset's shapes, built in place on the device in `dtype`."""
    from benchmarks.realtime.build import tiny_llm_config, vicuna_7b_config
    from flash_vstream.model import VStreamLlamaForCausalLM

    config = vicuna_7b_config() if preset == "7b" else tiny_llm_config()
    torch.manual_seed(seed)
    with torch.device(device):
        model = VStreamLlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # answers are exactly --answer-tokens long
    return model


def questions(model, k, memory_tokens, prompt_tokens, seed):
    """K (prompt ids (L,), memory (N, D)) pairs: different prompts (lengths around `prompt_tokens`) and memories."""
    vocab, width = model.config.vocab_size, model.config.mm_hidden_size
    template = torch.randint(3, vocab, (PREFIX_TEXT,), generator=torch.Generator().manual_seed(seed))
    template[0] = 1  # BOS
    gen = torch.Generator().manual_seed(seed + k)
    out = []
    for i in range(k):
        length = max(PREFIX_TEXT + 3, prompt_tokens + (i % 9) - 4)  # ~prompt_tokens text tokens, +-4
        ids = torch.randint(3, vocab, (length,), generator=gen)
        ids[:PREFIX_TEXT], ids[PREFIX_TEXT] = template, IMAGE_TOKEN_INDEX  # one template, then the question
        memory = torch.randn(memory_tokens, width, generator=gen).to(model.device, model.dtype)
        out.append((ids, memory))
    return out


def run_batched(model, items, answer_tokens, cuda_graph, max_prefill_tokens):
    """All items arrive at t0 and go through one BatchDecoder of len(items) slots -> per-question times."""
    device = model.device
    longest = max(len(ids) - 1 + len(memory) for ids, memory in items)
    decoder = BatchDecoder(model, max_slots=len(items), max_len=round_up(longest + answer_tokens + 1),
                           max_prefill_tokens=max_prefill_tokens, cuda_graph=cuda_graph)

    def one_round():
        first, done = {}, {}
        sync(device)
        t0 = time.perf_counter()
        requests = []
        for i, (ids, memory) in enumerate(items):
            def seen(tokens, i=i):
                first.setdefault(i, time.perf_counter())
            request = BatchRequest(decoder.embed(ids, memory, name=f"question {i}"), answer_tokens, on_tokens=seen,
                                   name=f"question {i}")
            requests.append(decoder.add(request))
        steps = 0
        while not decoder.idle:
            for request in decoder.step():
                done[requests.index(request)] = time.perf_counter()
            steps += 1
        sync(device)
        end = time.perf_counter()
        bad = [r.name for r in requests if r.finish_reason != "length" or len(r.tokens) != answer_tokens]
        if bad:
            raise RuntimeError(f"batched answers ended early: {bad} ({requests[0].error})")
        return t0, end, first, done, steps, [r.tokens for r in requests]

    reset_peak(device)
    one_round()  # warm-up: the decode graphs of this K's shapes are captured here
    reset_peak(device)
    t0, end, first, done, steps, tokens = one_round()
    ttft = [1e3 * (first[i] - t0) for i in range(len(items))]
    answer = [1e3 * (done[i] - t0) for i in range(len(items))]
    out = {"tokens_per_s": round(len(items) * answer_tokens / (end - t0), 1), "total_ms": round(1e3 * (end - t0), 1),
           "ttft_ms": summary(ttft, digits=2), "answer_ms": summary(answer, digits=2), "steps": steps,
           "kv_gb": round(decoder.kv_bytes / 1e9, 3), "slot_len": decoder.max_len, "peak_gb": peak_gb(device),
           "graphs": len(decoder._graphs), "graph_errors": {f"{r}x{l}": e[:200] for (r, l), e in decoder.errors.items()},
           "tokens": tokens}
    return out  # the decoder (its cache and graphs) goes with this frame: the caller frees the memory


def run_sequential(decoder, items, answer_tokens):
    """Today's design: each question after the one before, through the fast path's decoder, its prompt
    prefix refreshed beforehand (as the session does at ingest: not on the question path, not in the waits)."""
    device = decoder.device
    waited, ttft, answer, prefix, answers = 0.0, [], [], [], []
    for ids, memory in items:
        sync(device)
        began = time.perf_counter()
        decoder.cache_prefix(prefix_through_image(ids), memory)
        sync(device)
        prefix.append(1e3 * (time.perf_counter() - began))
        began = time.perf_counter()
        decoder.prefill(ids, memory)
        decoder.tokens()  # the host has the first token
        first = time.perf_counter()
        decoder.decode(answer_tokens - 1)
        tokens = decoder.tokens()
        end = time.perf_counter()
        if len(tokens) != answer_tokens:
            raise RuntimeError(f"the fast path gave {len(tokens)} tokens, not {answer_tokens}")
        answers.append(tokens)
        ttft.append(1e3 * (waited + first - began))
        answer.append(1e3 * (waited + end - began))
        waited += end - began
    return {"tokens_per_s": round(len(items) * answer_tokens / waited, 1), "total_ms": round(1e3 * waited, 1),
            "ttft_ms": summary(ttft, digits=2), "answer_ms": summary(answer, digits=2),
            "prefix_ms": summary(prefix, digits=2), "kv_gb_one_decoder": round(_cache_bytes(decoder) / 1e9, 3),
            "kv_gb_one_per_session": round(len(items) * _cache_bytes(decoder) / 1e9, 3), "tokens": answers}


def agreement(a, b):
    """How two runs' answers (lists of token lists) agree: exactly, in the first token, and the mean length of
    the common prefix (bf16 batched and batch-1 products round differently, so greedy answers of random
    weights drift apart after some tokens; in fp32 the tests pin them equal)."""
    common = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        common.append(n)
    return {"identical": sum(x == y for x, y in zip(a, b)), "first_token": sum(bool(x and y and x[0] == y[0])
                                                                            for x, y in zip(a, b)),
            "mean_common_prefix": round(sum(common) / len(common), 1), "of": len(common)}


def _cache_bytes(decoder):
    return sum(t.nelement() * t.element_size() for layer in decoder._cache.layers
               for t in (layer.keys, layer.values) if t is not None)


def print_table(results, device_name):
    log(f"\nBatched answers vs one at a time ({device_name})")
    log("| K | mode | tokens/s | first token p50 / p99 ms | answer p50 / p99 ms | KV GB | peak GB |")
    log("|---|---|---|---|---|---|---|")
    for k, row in results.items():
        for mode in ("sequential", "batched", "batched_eager"):
            r = row.get(mode)
            if r is None:
                continue
            kv = r.get("kv_gb", r.get("kv_gb_one_per_session"))
            log(f"| {k} | {mode} | {r['tokens_per_s']} | {r['ttft_ms']['p50']} / {r['ttft_ms']['p99']} | "
                f"{r['answer_ms']['p50']} / {r['answer_ms']['p99']} | {kv} | {r.get('peak_gb')} |")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.answers", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="the JSON report")
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--ks", default=None, help="concurrent questions, e.g. 1,4,16,64")
    p.add_argument("--eager-ks", default=None, help="K values also run with the eager batched decode step")
    p.add_argument("--max-prefill-tokens", type=int, default=8192, help="prompt tokens joining per step")
    p.add_argument("--compile-decode", action="store_true", help="the fast path's decode step compiled (slow)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    ks = tuple(int(x) for x in args.ks.split(",")) if args.ks else preset["ks"]
    eager_ks = (preset["eager_ks"] if args.eager_ks is None else  # "": none
                tuple(int(x) for x in args.eager_ks.split(",")) if args.eager_ks else ())
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cuda = device.type == "cuda"
    started = time.perf_counter()
    model = build_model(args.preset, device, dtype, args.seed)
    log(f"model built in {time.perf_counter() - started:.1f} s")
    report = {"environment": environment(device), "preset": args.preset, "dtype": str(dtype),
              "memory_tokens": preset["memory_tokens"], "prompt_tokens": preset["prompt_tokens"],
              "answer_tokens": preset["answer_tokens"], "max_prefill_tokens": args.max_prefill_tokens, "results": {}}
    answer_tokens = preset["answer_tokens"]

    # the fast path as a session builds it (compile off unless asked: it costs 30-50 s on a 7B)
    fast_path = FastPath(model, FastPathOptions(enabled=True, compile_decode="auto" if args.compile_decode else False))
    fast_path.fuse_weights()
    longest = max(len(ids) - 1 + len(m) for ids, m in questions(model, max(ks), preset["memory_tokens"],
                                                                 preset["prompt_tokens"], args.seed))
    decoder = fast_path.decoder(longest + answer_tokens + 2)
    began = time.perf_counter()
    decoder.setup()
    report["fast_path"] = {"decode": decoder.mode, "setup_s": round(time.perf_counter() - began, 1),
                           "fallbacks": dict(fast_path.fallbacks.reasons)}
    log(f"fast path decoder: {decoder.mode} ({report['fast_path']['setup_s']} s)")
    warm = questions(model, 2, preset["memory_tokens"], preset["prompt_tokens"], args.seed + 1000)
    run_sequential(decoder, warm, answer_tokens)  # warm-up: the question graphs of the suffix sizes

    for k in ks:
        items = questions(model, k, preset["memory_tokens"], preset["prompt_tokens"], args.seed)
        reset_peak(device)
        row = {"sequential": run_sequential(decoder, items, answer_tokens)}
        row["sequential"]["peak_gb"] = peak_gb(device)
        row["batched"] = run_batched(model, items, answer_tokens, cuda, args.max_prefill_tokens)
        free_memory(device)
        if cuda and k in eager_ks:
            row["batched_eager"] = run_batched(model, items, answer_tokens, False, args.max_prefill_tokens)
            free_memory(device)
        seq, bat = row["sequential"], row["batched"]
        row["agreement"] = {"batched_vs_one_at_a_time": agreement(bat["tokens"], seq["tokens"])}
        if "batched_eager" in row:
            row["agreement"]["graph_vs_eager"] = agreement(bat["tokens"], row["batched_eager"]["tokens"])
        for r in (seq, bat, row.get("batched_eager") or {}):
            r.pop("tokens", None)
        row["ratio"] = {"tokens_per_s": round(bat["tokens_per_s"] / seq["tokens_per_s"], 2),
                        "ttft_p99": round(seq["ttft_ms"]["p99"] / bat["ttft_ms"]["p99"], 2),
                        "answer_p99": round(seq["answer_ms"]["p99"] / bat["answer_ms"]["p99"], 2)}
        report["results"][str(k)] = row
        log(f"K={k}: batched {bat['tokens_per_s']} tokens/s, one at a time {seq['tokens_per_s']} "
            f"({row['ratio']['tokens_per_s']}x); first token p99 {bat['ttft_ms']['p99']} vs {seq['ttft_ms']['p99']} ms; "
            f"agreement {row['agreement']}")
        write_json(args.output, report)
    if "1" in report["results"]:
        one = report["results"]["1"]
        report["k1_first_token_ms"] = {"fast_path": one["sequential"]["ttft_ms"]["p50"],
                                       "fast_path_with_prefix": round(one["sequential"]["ttft_ms"]["p50"]
                                                                      + one["sequential"]["prefix_ms"]["p50"], 2),
                                       "batch": one["batched"]["ttft_ms"]["p50"]}
        report["k1_first_token_ms"]["batch_over_fast_path"] = round(
            one["batched"]["ttft_ms"]["p50"] / one["sequential"]["ttft_ms"]["p50"], 2)
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_json(args.output, report)
    print_table(report["results"], report["environment"].get("device", device.type))
    if "k1_first_token_ms" in report:
        log(f"K=1 first token: fast path {report['k1_first_token_ms']}")
    log(f"total {report['total_s']} s; JSON: {args.output}")
    return report


if __name__ == "__main__":
    main()
