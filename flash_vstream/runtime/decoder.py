"""Fast batch-1 greedy decoding for `VStreamLlamaForCausalLM`: a static KV cache and one captured decode step.

Stock `generate` spends most of a 7B decode step in Python and kernel launches, far from the
memory-bandwidth limit (docs/benchmarks.md has the numbers).
`GreedyDecoder` removes both:

1. prefill: the prompt (memory tokens spliced in by `embed_with_memory`) goes through the model's
   own forward once, filling a transformers `StaticCache` (fixed-size K/V tensors), no `generate`;
2. decode: one step -- token id in a static buffer, position in a static buffer, attention over the
   whole static cache under an explicit mask -- is captured once into a `torch.cuda.CUDAGraph` and
   replayed per token. The step writes its argmax back into the input buffer and appends it to an
   on-device token list, so the host neither syncs nor launches per token; it reads the tokens once
   at the end (and every `check_every` tokens when an EOS can end the answer early).
3. optionally the step is first compiled (`torch.compile`, default mode: no cudagraph trees, which
   is what failed in transformers' own static-cache path) so that RMSNorm, RoPE, SiLU-gating and the
   residual adds become a few fused kernels instead of ~40 small ones per layer; the compiled step
   is captured into the same kind of graph;
   on CUDA the step is `FusedDecodeStep` (fused_decode.py): the same layer arithmetic over fused
   q/k/v and gate/up weights, four matrix-vector products per layer instead of seven, each a
   Triton kernel with the layer's RMSNorms, SiLU gating and residual adds folded in;
4. a kept prefix: `cache_prefix` runs the prompt through `<image>` (system text + memory, ~720 tokens)
   into cache slots [0, P) and keeps it; a later prompt that starts with the same ids and the same
   memory tensor runs only its own tokens from slot P -- on CUDA padded to a 32-token bucket and
   replayed as one CUDA graph per bucket (an eager 7B forward is bound by its kernel launches at
   any length). Answers write after P, so the prefix serves any number of questions. The realtime
   session refreshes it after every frame, which takes the memory's prefill off the question's path.

Every switch is an explicit argument (all off by default: the plain static-cache loop); `FastPath`
(fast_path.py) picks them from resolved `FastPathOptions`. The graph is set up once per decoder
(`setup()`, on a throwaway one-token prompt: compile, warm-up on a side stream, capture). With
`strict`, a step that fails there raises `FastPathError`; otherwise the failure is recorded in
`errors`, reported once to `on_fallback`, and the next simpler step is used: Triton compiled -> fused
compiled -> compiled -> Triton -> fused -> the model's own step, each in a graph, then the eager loop.
Off CUDA the chosen step runs eagerly in a loop (`fused_step=True` picks the fused one,
`triton_kernels=True` its Triton products, in Triton's interpreter), so the CPU tests check the exact
code the graph replays against `model.generate`. The fused step reads weights fused beforehand
(`FastPath.fuse_weights()`): building or setting up a decoder never changes the model's parameters.
"""

import inspect

import torch

from ..constants import IMAGE_TOKEN_INDEX
from ..mm_utils import expand_image_tokens
from .cuda_utils import capture_graph, sync
from .fused_decode import FusedDecodeStep
from .options import FastPathError

CACHE_ALIGN = 128  # static cache lengths are multiples of this (keeps SDPA's mask aligned, few distinct sizes)
SUFFIX_BUCKET = 32  # a question after a cached prefix runs padded to a multiple of this (one graph per size)


def round_up(n, multiple=CACHE_ALIGN):
    return -(-int(n) // multiple) * multiple


def _cache_kwarg(model):
    """The name LlamaModel.forward takes the cache under: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(model.get_model().forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefix_through_image(input_ids):
    """(L,) prompt ids -> the ids through its `<image>` placeholder: the part `cache_prefix` keeps (system
    text + memory), the same for every question asked with one prompt template."""
    ids = input_ids.reshape(-1)
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    return ids[:at + 1]


def _last_logits(model, cache, **inputs):
    """The model's forward into the static cache (`cache`: {keyword: cache}) -> logits of the last position (1, vocab)."""
    return model(use_cache=True, logits_to_keep=1, **cache, **inputs).logits[:, -1]


def make_static_cache(config, max_cache_len, device, dtype):
    """A transformers `StaticCache` of `max_cache_len` positions for batch 1.

    Built from the installed version's signature: 5.x takes (config, max_cache_len) and allocates its
    K/V lazily at the first update (on the device and in the dtype of the keys); older versions also
    wanted a batch size, device and dtype up front.
    """
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": config, "max_cache_len": int(max_cache_len)}
    for name, value in (("max_batch_size", 1), ("batch_size", 1), ("device", device), ("dtype", dtype)):
        if name in params:
            kwargs[name] = value
    with torch.device(device):  # the per-layer position counters are created here
        return StaticCache(**kwargs)


class GreedyDecoder:
    """Greedy decoding of one prompt at a time with a static cache (and a CUDA graph on CUDA).

    `generate(input_ids, memory=tokens, max_new_tokens=n)` returns the same tokens as
    `model.generate(input_ids, memory=[tokens], max_new_tokens=n, do_sample=False)` (new tokens only,
    ending at the first EOS when `eos_token_id` is given). One decoder serves any number of questions;
    it is not thread-safe. `max_cache_len` bounds prompt + answer (memory tokens included).

    cuda_graph: the decode step (and the question after a kept prefix) as CUDA graphs (CUDA only);
    compile_step: `torch.compile` the step, `compile_options` going to it (e.g. {"backend": "eager"} to
    check tracing alone); fused_step: the step over fused q/k/v and gate/up weights (fused_decode.py;
    the weights fused beforehand); triton_kernels: that step's products as Triton kernels (needs
    fused_step); pad_suffix: questions after a kept prefix padded to SUFFIX_BUCKET tokens; strict: a
    step that fails raises `FastPathError` instead of falling back; on_fallback(part, reason): told once
    per fallback; warmup_stream: the side stream captures warm up on (None: one of the decoder's own).
    """

    def __init__(self, model, max_cache_len=1024, cuda_graph=False, compile_step=False, compile_options=None,
                 warmup_steps=3, check_every=16, pad_suffix=False, fused_step=False, triton_kernels=False,
                 strict=False, on_fallback=None, warmup_stream=None):
        self.model = model
        self.device = model.device
        self.dtype = model.get_model().embed_tokens.weight.dtype
        self.max_cache_len = round_up(max_cache_len)
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.compile_step = bool(compile_step)
        self.compile_options = {"dynamic": False, **(compile_options or {})}
        # the decode step over fused q/k/v and gate/up weights (fused_decode.py), else the model's forward
        self.fused_step = bool(fused_step)
        # the fused step's products as Triton kernels with their norms, gating and residuals folded in
        # (triton_kernels.py)
        self.triton_kernels = bool(triton_kernels)
        if self.triton_kernels and not self.fused_step:
            raise ValueError("triton_kernels=True runs the fused step's products: it needs fused_step=True")
        self.strict = bool(strict)
        self.on_fallback = on_fallback
        self.warmup_stream = warmup_stream
        self.warmup_steps = max(1, int(warmup_steps))
        self.check_every = max(1, int(check_every))
        self.errors = {}  # setup failures by attempt ("triton_compiled", "fused_compiled", ...; "fuse")
        self.mode = "eager"  # how decode steps run: [triton_|fused_][compiled_]cuda_graph, or ..._eager
        self._cache = make_static_cache(model.config, self.max_cache_len, self.device, self.dtype)
        self._cache_kwargs = {_cache_kwarg(model): self._cache}  # how the model's forward takes the cache
        long = dict(dtype=torch.long, device=self.device)
        self._ids = torch.zeros(1, 1, **long)  # token fed to the next step
        self._pos = torch.zeros(1, **long)  # its position
        self._count = torch.zeros(1, **long)  # tokens generated so far
        self._tokens = torch.zeros(self.max_cache_len, **long)  # generated tokens, on device
        self._slots = torch.arange(self.max_cache_len, **long)  # (L,) cache positions
        self._step_fn = self._model_step(model)  # (ids (1, 1), position (1,), mask) -> logits (1, vocab)
        self._graph = None
        self._length = None  # prompt length of the current answer
        self._prefix = None  # (ids, memory, length) of the prompt prefix kept in cache slots [0, length)
        # the tokens after a cached prefix run padded to a multiple of SUFFIX_BUCKET, from static buffers,
        # as one CUDA graph per bucket on CUDA (an eager 7B forward is bound by its launches at any length)
        self.pad_suffix = bool(pad_suffix)
        self._suffix = {}  # bucket -> (ids (1, B), positions (B,), last index (1,), first token (1,), graph)
        self._suffix_pool = None
        # False: a size without a graph runs eagerly instead of being captured (a capture while another
        # thread launches work on the GPU can fail; the session turns this off after warming up sizes)
        self.capture_new_suffixes = True
        self._generated = 0  # tokens generated since the last prefill (host-side count)
        self._ready = not (self.cuda_graph or self.compile_step or self.fused_step)  # the plain loop: nothing to set up

    @property
    def ready(self):
        """Whether the decode step is chosen (set up, or nothing to set up): then `mode` says what runs."""
        return self._ready

    # --- setup: compile, warm up, capture -----------------------------------------------------------
    @torch.inference_mode()
    def setup(self):
        """Compile and/or capture the decode step, on a throwaway one-token prompt (a real prefill resets
        the cache). `strict`: a failure raises `FastPathError`; otherwise it is recorded in `errors` and
        the next simpler step is used."""
        if self._ready:
            return self
        self._ready = True
        if self.cuda_graph and self.warmup_stream is None:
            self.warmup_stream = torch.cuda.Stream(self.device)  # one for all of this decoder's captures
        graph = "cuda_graph" if self.cuda_graph else "eager"
        attempts = [(name, fused, compiled, triton) for name, fused, compiled, triton in (
            ("triton_compiled", True, True, True), ("fused_compiled", True, True, False),
            ("compiled", False, True, False), ("triton", True, False, True), ("fused", True, False, False),
            ("eager", False, False, False))
            if (self.fused_step or not fused) and (self.compile_step or not compiled)
            and (self.triton_kernels or not triton)]
        for name, fused, compiled, triton in attempts if self.cuda_graph else attempts[:1]:
            try:
                self._step_fn = self._fused_step(compiled, triton) if fused else self._model_step(
                    torch.compile(self.model, **self.compile_options) if compiled else self.model)
                self.prefill(torch.ones(1, dtype=torch.long))
                if self.cuda_graph:  # warm-up (and compilation) off the capture; the recording changes no state
                    self._graph, _ = capture_graph(self._step, self.device, self.warmup_steps,
                                                   stream=self.warmup_stream)
                else:
                    for _ in range(self.warmup_steps):  # compiles
                        self._step()
                self.mode = f"{name}_{graph}" if name != "eager" else graph
                break
            except Exception as error:  # noqa: BLE001 -- any failure: raise (strict) or try the next simpler step
                self.errors[name] = f"{type(error).__name__}: {str(error)[:1000]}"
                self._graph = None
                sync(self.device)
                if self.strict:
                    raise FastPathError(f"decode step {name!r} ({graph})", self.errors[name]) from error
        else:
            self._step_fn, self.mode = self._model_step(self.model), "eager"
        if self.errors and self.on_fallback is not None:
            self.on_fallback("decode step", f"runs {self.mode}; " + "; ".join(
                f"{name} failed: {error[:300]}" for name, error in self.errors.items()))
        return self

    # the step functions close over the model and the cache, not over the decoder: no reference cycle
    # (the realtime session freezes the heap after warming up, and frozen cycles are never collected)
    def _model_step(self, model):
        cache = self._cache_kwargs

        def step(ids, position, mask):
            return _last_logits(model, cache, input_ids=ids, position_ids=position.view(1, 1), attention_mask=mask)
        return step

    def _fused_step(self, compiled, triton):
        fused, cache = FusedDecodeStep(self.model, triton=triton), self._cache
        run = torch.compile(fused.__call__, **self.compile_options) if compiled else fused

        def step(ids, position, mask):
            return run(ids, position, mask, cache)
        return step

    # --- prompt -----------------------------------------------------------------------------------
    def embed(self, input_ids, memory=None):
        """(L,) or (1, L) ids with one `<image>` and (N, D) memory tokens (or neither) -> (1, L', hidden)."""
        ids = input_ids.reshape(-1)
        has_image = bool((ids == IMAGE_TOKEN_INDEX).any())
        if has_image != (memory is not None):
            raise ValueError("give memory tokens exactly when the prompt holds an <image> placeholder")
        if memory is None:
            return self.model.get_model().embed_tokens(ids.to(self.device)[None])  # (1, L, hidden)
        ids = expand_image_tokens(ids.cpu(), len(memory)).to(self.device)[None]  # (1, L - 1 + N)
        return self.model.embed_with_memory(ids, [memory])  # (1, L - 1 + N, hidden)

    def _mask(self, positions):
        """(P,) query positions -> (1, 1, P, L) bool: each attends the cache slots up to its own position.
        An explicit mask over the whole static cache: no dependence on transformers' mask helpers."""
        return (self._slots[None, :] <= positions[:, None]).view(1, 1, positions.shape[0], -1)

    def _set_cache_length(self, length):
        """Point every layer's write position at `length` (in place, so a captured graph stays valid)."""
        for layer in self._cache.layers:
            layer.cumulative_length.fill_(length)

    def _run_prompt(self, embeds, start):
        """Embeddings (1, P, hidden) at positions start.. -> the first new token (1,); K/V into the cache."""
        length = start + embeds.shape[1]
        if length >= self.max_cache_len:
            raise ValueError(f"prompt of {length} tokens does not fit max_cache_len={self.max_cache_len}")
        if start:
            self._set_cache_length(start)
        else:
            self._cache.reset()  # in place: the captured step keeps pointing at the same K/V tensors
        positions = torch.arange(start, length, device=self.device)  # (P,)
        first = _last_logits(self.model, self._cache_kwargs, inputs_embeds=embeds,
                             position_ids=positions[None], attention_mask=self._mask(positions))
        return first.argmax(dim=-1), length  # (1,)

    def _suffix_forward(self, bucket):
        """Device-side only (what a suffix graph captures): the bucket's padded tokens at their positions
        -> the greedy token after the last real one. Pads write K/V past the real end; those slots are
        masked and rewritten by the decode steps."""
        ids, positions, last, first, _ = self._suffix[bucket]
        body = self.model.get_model()  # the LlamaModel: the wrapper's forward would look for <image> on the host
        out = body(inputs_embeds=body.embed_tokens(ids), position_ids=positions[None],
                   attention_mask=self._mask(positions), use_cache=True, **self._cache_kwargs)
        hidden = out.last_hidden_state[0]  # (B, hidden)
        logits = self.model.lm_head(hidden.index_select(0, last))  # (1, vocab): the last real token only
        first.copy_(logits.argmax(dim=-1))  # (1,)

    def _run_suffix(self, rest, start):
        n = len(rest)
        bucket = round_up(n, SUFFIX_BUCKET)
        if bucket not in self._suffix:
            long = dict(dtype=torch.long, device=self.device)
            self._suffix[bucket] = (torch.zeros(1, bucket, **long), torch.zeros(bucket, **long),
                                    torch.zeros(1, **long), torch.zeros(1, **long), None)
        ids, positions, last, first, graph = self._suffix[bucket]
        ids.zero_()
        ids[0, :n].copy_(rest)
        torch.arange(start, start + bucket, out=positions)
        last.fill_(n - 1)
        self._set_cache_length(start)
        if self.cuda_graph and graph is None and self.capture_new_suffixes and "suffix_graph" not in self.errors:
            try:
                graph = self._capture_suffix(bucket, start)
            except Exception as error:  # noqa: BLE001 -- raise (strict) or record it: the padded eager forward answers
                self.errors["suffix_graph"] = f"{type(error).__name__}: {str(error)[:1000]}"
                sync(self.device)
                if self.strict:
                    raise FastPathError("question graph", self.errors["suffix_graph"]) from error
                if self.on_fallback is not None:
                    self.on_fallback("question graph", f"questions run eagerly; {self.errors['suffix_graph'][:300]}")
                self._set_cache_length(start)
        if graph is not None:
            graph.replay()
        else:
            self._suffix_forward(bucket)
        self._set_cache_length(start + n)  # the decode steps write from the real end, over the pads
        return first.clone(), start + n

    def _capture_suffix(self, bucket, start):
        # the warm-up calls write only the slots the real run writes next
        graph, _ = capture_graph(lambda: self._suffix_forward(bucket), self.device, warmup=2,
                                 pool=self._suffix_pool, before_each=lambda: self._set_cache_length(start),
                                 stream=self.warmup_stream)
        self._suffix_pool = graph.pool()  # one memory pool for all sizes: they never run at once
        self._suffix[bucket] = (*self._suffix[bucket][:4], graph)
        return graph

    @torch.inference_mode()
    def warm_up_suffixes(self, prefix_ids, memory_tokens, memory_dim, sizes=(SUFFIX_BUCKET, 2 * SUFFIX_BUCKET)):
        """Capture the question graphs of these suffix sizes now (those that fit the cache), over a
        throwaway prefix of zeros: a first question of a new size would otherwise pay the capture.
        The graphs share one memory pool."""
        if not self.pad_suffix:
            return
        dummy = torch.zeros(memory_tokens, memory_dim, device=self.device, dtype=self.dtype)
        ids = prefix_ids.reshape(-1).cpu()
        for size in sizes:
            if len(ids) - 1 + memory_tokens + size + 1 < self.max_cache_len:
                self.cache_prefix(ids, dummy)
                self.prefill(torch.cat([ids, torch.ones(size, dtype=ids.dtype)]), dummy)
        self._prefix, self._length = None, None

    @torch.inference_mode()
    def cache_prefix(self, prefix_ids, memory=None):
        """Run the prompt's prefix -- everything up to and including `<image>`, i.e. the system text and the
        memory -- into the cache and keep it there. A later `prefill` whose prompt starts with the same ids
        and the same `memory` tensor (by identity: snapshots are never mutated) runs only its own
        remaining tokens: a question costs a few tokens of prefill instead of ~700. Answers write
        their tokens after the prefix, so it survives any number of questions. Returns its length."""
        self.setup()
        ids = prefix_ids.reshape(-1).cpu()
        if (ids == IMAGE_TOKEN_INDEX).sum() != (0 if memory is None else 1) or (
                memory is not None and ids[-1] != IMAGE_TOKEN_INDEX):
            raise ValueError("a cached prefix ends with the prompt's one <image> placeholder (or has none "
                             "and no memory)")
        self._prefix = None
        _, length = self._run_prompt(self.embed(ids, memory), 0)
        self._prefix = (ids.tolist(), memory, length)
        self._length = None  # the next decode needs a prefill
        return length

    def prefix_matches(self, input_ids, memory=None):
        """Whether `prefill(input_ids, memory)` would reuse the cached prefix."""
        if self._prefix is None:
            return False
        ids, cached_memory, _ = self._prefix
        head = input_ids.reshape(-1)[:len(ids)]
        return cached_memory is memory and len(head) == len(ids) and head.tolist() == ids

    @torch.inference_mode()
    def prefill(self, input_ids, memory=None):
        """Run the prompt through the model into the static cache; returns the first new token (1,) on device.
        Only the tokens after a matching `cache_prefix` run; otherwise the whole prompt does (and any
        cached prefix is dropped, its slots being overwritten)."""
        self.setup()
        if self.prefix_matches(input_ids, memory):
            ids, _, start = self._prefix
            rest = input_ids.reshape(-1)[len(ids):]
            if len(rest) == 0 or bool((rest == IMAGE_TOKEN_INDEX).any()):
                raise ValueError("the prompt after a cached prefix needs >= 1 token and no <image>")
            if self.pad_suffix and start + round_up(len(rest), SUFFIX_BUCKET) <= self.max_cache_len:
                first, length = self._run_suffix(rest, start)
            else:
                first, length = self._run_prompt(self.embed(rest), start)
        else:
            self._prefix = None
            first, length = self._run_prompt(self.embed(input_ids, memory), 0)
        self._ids.copy_(first.view(1, 1))
        self._pos.fill_(length)
        self._count.fill_(1)
        self._tokens[:1].copy_(first)
        self._length = length
        self._generated = 1
        return first

    # --- decode -----------------------------------------------------------------------------------
    def _step(self):
        """One decode step, device-side only (this is what the graph captures)."""
        logits = self._step_fn(self._ids, self._pos, self._mask(self._pos))
        token = logits.argmax(dim=-1)  # (1,)
        self._ids.copy_(token.view(1, 1))
        self._tokens.index_copy_(0, self._count, token)
        self._count.add_(1)
        self._pos.add_(1)

    @torch.inference_mode()
    def decode(self, steps, eos_token_id=None):
        """Run up to `steps` decode steps after `prefill`; stops early (checked every `check_every`
        steps) once an EOS is among the tokens. Returns the steps run."""
        if self._length is None:
            raise RuntimeError("decode() before prefill()")
        if self._length + self._generated + steps > self.max_cache_len:
            raise ValueError(f"{self._length} prompt + {self._generated + steps} new tokens exceed "
                             f"max_cache_len={self.max_cache_len}")
        eos = None if eos_token_id is None else torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=self.device)
        for done in range(1, steps + 1):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
            if eos is not None and done % self.check_every == 0:  # host sync, only when an EOS can end the answer
                if bool(torch.isin(self._tokens[:self._generated + done], eos).any()):
                    self._generated += done
                    return done
        self._generated += steps
        return steps

    def tokens(self):
        """The tokens generated since the last `prefill` (a host read: it waits for the GPU)."""
        return self._tokens[:self._generated].tolist()

    @torch.inference_mode()
    def generate(self, input_ids, memory=None, max_new_tokens=64, eos_token_id=None):
        """Greedy answer to one prompt -> (1, n) new token ids (n <= max_new_tokens; ends at the first EOS)."""
        if max_new_tokens < 1:
            return torch.zeros(1, 0, dtype=torch.long, device=self.device)
        self.prefill(input_ids, memory)
        self.decode(max_new_tokens - 1, eos_token_id)
        tokens = self.tokens()  # the one host read of the answer
        if eos_token_id is not None:
            eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
            end = next((i for i, t in enumerate(tokens) if t in eos), None)
            tokens = tokens if end is None else tokens[:end + 1]
        return torch.tensor([tokens], dtype=torch.long, device=self.device)


def greedy_generate(model, input_ids, memory=None, max_new_tokens=64, eos_token_id=None, cuda_graph=False):
    """One-shot convenience: a decoder sized for this prompt, without a graph by default (setting one up
    costs more than it saves for a single answer; keep a `GreedyDecoder` to answer many questions)."""
    n_memory = 0 if memory is None else len(memory)
    decoder = GreedyDecoder(model, max_cache_len=input_ids.numel() + n_memory + max_new_tokens + 1,
                            cuda_graph=cuda_graph, compile_step=False)
    return decoder.generate(input_ids, memory, max_new_tokens, eos_token_id)
