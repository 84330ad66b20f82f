"""Continuous batching of answers: many questions, from different sessions, share prefill and decode steps.

A `BatchDecoder` holds a slot KV cache -- per layer K and V of shape (max_slots, kv heads, max_len,
head dim) -- and runs the LLaMA layers of `VStreamLlamaForCausalLM` itself over it (the same arithmetic
as the model's forward: its own norms, projections, rotary embedding and MLP modules, attention by
PyTorch SDPA on CPU and CUDA). One `BatchRequest` is one answer: its prompt embeddings (the session's
memory snapshot projected and spliced in place of `<image>`, then the question), a token limit and the
callbacks that stream its tokens. Each `step()`:

1. lets waiting requests join: each takes a free slot and the joiners prefill together, padded to the
   longest prompt, causal, at positions 0.. of their own slots (a prefill-token budget bounds how many
   join in one step); the prefill gives each its first token;
2. runs one decode step for every request that was already running: one new token per row, each row at
   its own position, attending its own slot's cache under an explicit mask;
3. hands each request its new token (one host read per step), and retires the finished ones -- EOS,
   the token limit, a stop its `on_tokens` callback reports, `should_stop()` (the client went away) --
   freeing their slots for the next step's joiners.

The decode step covers the slot range [0, rows) with `rows` the highest running slot + 1 rounded up to
a power of two (slots are handed out lowest first), and the keys [0, kv_len) with kv_len the longest
running row rounded up to CACHE_ALIGN: a few distinct shapes. A slot in that range that runs nothing
writes its K/V at the reserved last position of its own slot (never a real position) and its logits
are ignored. With `cuda_graph` each (rows, kv_len) shape's decode step is captured once as a CUDA
graph (on a side stream, thread-local capture mode: the ingest lane may use the GPU meanwhile) and
replayed; a capture that fails falls back to the eager step (strict: raises `FastPathError`). A joiner that
prefills alone (the common case when questions come one by one) replays the prefill graph of its prompt padded up
to a multiple of PREFILL_ALIGN (captured at `warm_up`, same fallback): its pads are masked as a batch's are.

Greedy rows (temperature 0) take the argmax; a row with temperature > 0 samples from its own
softmax(logits / temperature) (nucleus-truncated to `top_p`), from the decoder's seeded generator.
A request's error (its embedding, its callbacks) fails that request alone; a failure of a batched
forward fails the requests in that forward, naming the step. Not thread-safe: one lane drives it.
"""

import dataclasses
import heapq

import torch
import torch.nn.functional as F

from ..constants import IMAGE_TOKEN_INDEX
from ..mm_utils import expand_image_tokens
from .cuda_utils import sync
from .decoder import CACHE_ALIGN, round_up
from .options import FastPathError

FINISH_REASONS = ("eos", "length", "stop", "cancelled", "error")
PREFILL_ALIGN = 64  # a lone joiner's prefill graph covers its prompt padded up to a multiple of this


@dataclasses.dataclass(eq=False)
class BatchRequest:
    """One answer through the batch. `embeds`: (P, hidden) prompt embeddings (`BatchDecoder.embed`).

    on_tokens(new ids) -> True to end the answer there (e.g. a stop string appeared); runs after every step
    that gave this request tokens. should_stop() -> True: the answer leaves the batch before the next step
    (finish_reason "cancelled"). After it finishes: `tokens` (new ids, an EOS included), `finish_reason`
    (one of FINISH_REASONS) and `error` (the exception, for "error")."""

    embeds: torch.Tensor
    max_new_tokens: int
    eos_token_id: object = None  # int, a collection of ints, or None
    temperature: float = 0.0
    top_p: float | None = None
    on_tokens: object = None
    should_stop: object = None
    name: str = "request"  # how errors name it
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    slot: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{self.name}: max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"{self.name}: temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"{self.name}: top_p must be in (0, 1], got {self.top_p!r}")
        if self.embeds.dim() != 2 or self.embeds.shape[0] < 1:
            raise ValueError(f"{self.name}: embeds must be (P >= 1, hidden), got {tuple(self.embeds.shape)}")
        eos = self.eos_token_id
        self._eos = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)

    @property
    def prompt_len(self):
        return int(self.embeds.shape[0])

    @property
    def done(self):
        return self.finish_reason is not None


class BatchDecoder:
    """Continuous batching over a slot KV cache for one `VStreamLlamaForCausalLM`.

    max_slots: answers running at once; max_len: positions per slot (prompt with its memory + answer,
    rounded up to CACHE_ALIGN; the last one is reserved); max_prefill_tokens: the most (padded) prompt
    tokens joining in one step (at least one request always joins when a slot is free); cuda_graph: the
    decode step of each shape as a CUDA graph (CUDA only); strict: a graph that cannot be captured raises
    instead of running eagerly; seed: the sampling generator's.
    """

    def __init__(self, model, max_slots=16, max_len=1024, max_prefill_tokens=8192, cuda_graph=False,
                 strict=False, seed=0, on_fallback=None):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.model = model
        self.body = model.get_model()
        self.device = model.device
        self.dtype = self.body.embed_tokens.weight.dtype
        self.max_slots = int(max_slots)
        self.max_len = round_up(max_len)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.strict = bool(strict)
        self.on_fallback = on_fallback
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        config = model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.gqa = kv_heads != config.num_attention_heads
        shape = (self.max_slots, kv_heads, self.max_len, self.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.body.layers]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.body.layers]
        long = dict(dtype=torch.long, device=self.device)
        self._scratch = self.max_len - 1  # where a slot that runs nothing writes (never a real position)
        self._ids = torch.zeros(self.max_slots, **long)  # (S,) each slot's token fed to the next decode step
        self._pos = torch.full((self.max_slots,), self._scratch, **long)  # (S,) its position
        self._rows = torch.arange(self.max_slots, **long)  # (S,) slot indices
        self._key_slots = torch.arange(self.max_len, **long)  # (L,) cache positions
        self._free = list(range(self.max_slots))  # a heap: the lowest free slot first
        self._running = {}  # slot -> BatchRequest
        self._length = {}  # slot -> positions filled (host-side: no sync to size a step)
        self._waiting = []  # BatchRequest, in arrival order
        self._graphs = {}  # (rows, kv_len) -> (graph, logits (rows, vocab))
        # width -> (graph, hidden (1, width, hidden), slot (1,), last (1,), logits (1, vocab)): a lone joiner's prefill
        self._prefill_graphs = {}
        self._pool = None  # one memory pool for every decode graph (they never run at once)
        self._stream = None  # the side stream the captures warm up on
        self.errors = {}  # decode-graph capture failures by shape
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.steps = 0  # step() calls that ran a forward

    # --- sizes ---------------------------------------------------------------------------------------
    @property
    def kv_bytes(self):
        """Bytes of the slot cache (allocated once, whatever runs)."""
        return sum(t.nelement() * t.element_size() for t in self.keys + self.values)

    @property
    def running(self):
        return len(self._running)

    @property
    def waiting(self):
        return len(self._waiting)

    @property
    def idle(self):
        return not self._running and not self._waiting

    def fits(self, prompt_len, max_new_tokens):
        """Whether a prompt of `prompt_len` embeddings (memory included) and its answer fit a slot."""
        return prompt_len + max_new_tokens <= self._scratch

    @torch.inference_mode()
    def warm_up(self):
        """Capture the decode graph of every shape a step can take now (power-of-two slot ranges up to
        max_slots, key lengths in CACHE_ALIGN steps up to max_len), so no answer waits for a capture later;
        a no-op without `cuda_graph`. Call it before requests run. Returns the shapes captured."""
        if not self.cuda_graph:
            return 0
        rows, n = sorted({min(self.max_slots, 1 << k) for k in range(self.max_slots.bit_length() + 1)}), 0
        for r in rows:
            for kv_len in range(CACHE_ALIGN, self.max_len + 1, CACHE_ALIGN):
                if (r, kv_len) not in self._graphs and (r, kv_len) not in self.errors:
                    self._graph_logits(r, kv_len)
                    n += (r, kv_len) in self._graphs
        for width in range(PREFILL_ALIGN, self._scratch + 1, PREFILL_ALIGN):
            if width not in self._prefill_graphs and ("prefill", width) not in self.errors:
                n += self._prefill_graph(width) is not None
        sync(self.device)
        return n

    # --- requests ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, input_ids, memory=None, name="request"):
        """(L,) prompt ids with one `<image>` and (N, D) memory tokens (or neither) -> (L - 1 + N, hidden):
        the memory projected and spliced in, as the model's own forward does. Bad input raises ValueError
        naming `name`."""
        ids = torch.as_tensor(input_ids).reshape(-1).cpu()
        placeholders = int((ids == IMAGE_TOKEN_INDEX).sum())
        if placeholders != (0 if memory is None else 1):
            raise ValueError(f"{name}: the prompt holds {placeholders} <image> placeholders; give memory tokens "
                             "exactly when it holds one")
        if memory is None:
            return self.body.embed_tokens(ids.to(self.device))  # (L, hidden)
        width = self.model.config.mm_hidden_size
        if memory.dim() != 2 or memory.shape[0] < 1 or memory.shape[1] != width:
            raise ValueError(f"{name}: memory tokens must be (N >= 1, {width}), got {tuple(memory.shape)}")
        if not memory.is_floating_point():
            raise ValueError(f"{name}: memory tokens must be floating point, got {memory.dtype}")
        expanded = expand_image_tokens(ids, len(memory)).to(self.device)[None]  # (1, L - 1 + N)
        return self.model.embed_with_memory(expanded, [memory])[0]  # (L - 1 + N, hidden)

    def add(self, request):
        """Queue `request`; it joins the batch at the next step with a free slot."""
        if request.done or request.slot is not None or request in self._waiting:
            raise ValueError(f"{request.name}: already added")
        if request.embeds.shape[1] != self.model.config.hidden_size:
            raise ValueError(f"{request.name}: embeds of width {request.embeds.shape[1]}, the model's is "
                             f"{self.model.config.hidden_size}")
        if not self.fits(request.prompt_len, request.max_new_tokens):
            raise ValueError(f"{request.name}: a prompt of {request.prompt_len} tokens and {request.max_new_tokens} "
                             f"answer tokens do not fit a slot of {self._scratch} positions")
        self._waiting.append(request)
        return request

    def cancel(self, request, reason="cancelled"):
        """End `request` now (waiting or running), freeing its slot."""
        if request in self._waiting:
            self._waiting.remove(request)
            request.finish_reason = reason
        elif request.slot is not None and self._running.get(request.slot) is request:
            self._retire(request, reason)

    # --- one step --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self):
        """Join waiting requests (prefill), one decode step for the running ones, hand out the tokens,
        retire what finished. Returns the requests that finished in this step."""
        finished = []
        for request in list(self._waiting) + list(self._running.values()):
            if self._asked_to_stop(request):
                self.cancel(request, request.finish_reason or "cancelled")
                finished.append(request)
        decoding = sorted(self._running)  # slots already running: their next token comes from a decode step
        joiners = self._admit()
        outputs = []  # (requests, tokens (n,) on device)
        if joiners:
            try:
                outputs.append((joiners, self._prefill(joiners)))
            except Exception as error:  # noqa: BLE001 -- the joiners fail together, the others go on
                self._fail(joiners, error, "prefill", finished)
        if decoding:
            requests = [self._running[s] for s in decoding]
            try:
                outputs.append((requests, self._decode(decoding)))
            except Exception as error:  # noqa: BLE001 -- every row of the step fails
                self._fail(requests, error, "decode step", finished)
        if outputs:
            self.steps += 1
            tokens = torch.cat([t for _, t in outputs]).tolist()  # the step's one host read
            requests = [r for rs, _ in outputs for r in rs]
            for request, token in zip(requests, tokens):
                if self._hand_out(request, token):
                    finished.append(request)
        return finished

    def _asked_to_stop(self, request):
        try:
            return request.should_stop is not None and bool(request.should_stop())
        except Exception as error:  # noqa: BLE001 -- a failing callback fails its own request
            request.error, request.finish_reason = error, "error"
            return True

    def _admit(self):
        """Waiting requests into free slots, oldest first, within the prefill-token budget."""
        joiners, widest = [], 0
        while self._waiting and self._free:
            request = self._waiting[0]
            width = max(widest, request.prompt_len)
            if joiners and width * (len(joiners) + 1) > self.max_prefill_tokens:
                break
            self._waiting.pop(0)
            request.slot = heapq.heappop(self._free)
            self._running[request.slot] = request
            self._length[request.slot] = 0
            joiners.append(request)
            widest = width
        return joiners

    def _hand_out(self, request, token):
        """Give `request` its new token; True when that finished it (its slot is freed)."""
        request.tokens.append(token)
        # filled: the prompt and every token but the newest (the next decode step writes that one's K/V)
        self._length[request.slot] = request.prompt_len + len(request.tokens) - 1
        reason = None
        if token in request._eos:
            reason = "eos"
        elif len(request.tokens) >= request.max_new_tokens:
            reason = "length"
        try:
            if request.on_tokens is not None and request.on_tokens([token]) and reason is None:
                reason = "stop"
        except Exception as error:  # noqa: BLE001 -- a failing callback fails its own request
            request.error, reason = error, "error"
        if reason is None:
            return False
        self._retire(request, reason)
        return True

    def _retire(self, request, reason):
        slot = request.slot
        del self._running[slot]
        del self._length[slot]
        self._pos[slot] = self._scratch
        heapq.heappush(self._free, slot)
        request.finish_reason = reason

    def _fail(self, requests, error, where, finished):
        wrapped = RuntimeError(f"batched {where} of {len(requests)} answers failed: {type(error).__name__}: {error}")
        wrapped.__cause__ = error
        for request in requests:
            if request.slot is not None and self._running.get(request.slot) is request:
                self._retire(request, "error")
            request.error, request.finish_reason = wrapped, "error"
            finished.append(request)
        sync(self.device)

    # --- the forwards --------------------------------------------------------------------------------
    def _prefill(self, joiners):
        """The joiners' prompts, padded to the longest, causal, at positions 0.. of their slots -> each
        one's first token (J,). Pads write K/V past a prompt's end: masked, and rewritten by its decode.
        A lone joiner with `cuda_graph` replays the prefill graph of its padded width: the eager prefill is ~30
        launches a layer, the answer lane's largest host cost when questions come often."""
        if self.cuda_graph and len(joiners) == 1:
            width = min(round_up(joiners[0].prompt_len, PREFILL_ALIGN), self._scratch)
            entry = self._prefill_graphs.get(width)
            # a capture's warm-up runs write the scratch slot's cache: only while that slot runs nothing but this joiner
            if (entry is None and ("prefill", width) not in self.errors
                    and self._running.get(self._scratch_slot(), joiners[0]) is joiners[0]):
                entry = self._prefill_graph(width)
            if entry is not None:
                return self._replay_prefill(joiners[0], entry)
        lengths = [r.prompt_len for r in joiners]
        width = max(lengths)
        hidden = torch.zeros(len(joiners), width, self.model.config.hidden_size, device=self.device,
                             dtype=self.dtype)  # (J, P, hidden)
        for i, request in enumerate(joiners):
            hidden[i, :lengths[i]] = request.embeds.to(device=self.device, dtype=self.dtype)
        slots = torch.tensor([r.slot for r in joiners], dtype=torch.long, device=self.device)  # (J,)
        positions = self._key_slots[:width].expand(len(joiners), width)  # (J, P)
        hidden = self._layers(hidden, positions, slots, kv_len=None)  # (J, P, hidden)
        lengths_t = torch.tensor(lengths, device=self.device)  # (J,)
        logits = self._logits(hidden[torch.arange(len(joiners), device=self.device), lengths_t - 1])  # (J, vocab)
        for request, length in zip(joiners, lengths):
            self._length[request.slot] = length
        self._pos[slots] = lengths_t  # the first token's position, per slot
        tokens = self._select(logits, joiners)  # (J,)
        self._ids[slots] = tokens  # the next decode step's inputs
        return tokens

    def _padded_prefill(self, hidden, slot, last):
        """Device-side only (what a prefill graph captures): one prompt (1, W, hidden), padded, at positions 0.. of
        cache row `slot` (1,) -> the logits (1, vocab) at index `last` (1,), its last real token."""
        width = hidden.shape[1]
        hidden = self._layers(hidden, self._key_slots[:width].expand(1, width), slot, kv_len=None)  # (1, W, hidden)
        return self._logits(hidden[0].index_select(0, last))  # (1, vocab)

    def _replay_prefill(self, request, entry):
        """`request`'s prompt into the static inputs of its width's prefill graph, replayed -> its first token (1,)."""
        graph, hidden, slot, last, logits = entry
        length = request.prompt_len
        hidden.zero_()  # pads: zeros, as the eager prefill's
        hidden[0, :length] = request.embeds.to(device=self.device, dtype=self.dtype)
        slot.fill_(request.slot)
        last.fill_(length - 1)
        if graph is None:  # no capture (a CPU test of the padded path): the same body, eagerly
            logits = self._padded_prefill(hidden, slot, last)
        else:
            graph.replay()
        self._length[request.slot] = length
        self._pos[slot] = last + 1  # the first token's position
        tokens = self._select(logits, [request])  # (1,)
        self._ids[slot] = tokens
        return tokens

    def _prefill_graph(self, width, capture=True):
        """The static inputs and (capture) the graph of a lone prefill `width` wide, or None when the capture
        failed (recorded; that width prefills eagerly from now on; strict: raises)."""
        hidden = torch.zeros(1, width, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
        slot = torch.full((1,), self._scratch_slot(), dtype=torch.long, device=self.device)
        last = torch.zeros(1, dtype=torch.long, device=self.device)
        if not capture:
            return None, hidden, slot, last, None
        try:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            current = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                for _ in range(2):
                    self._padded_prefill(hidden, slot, last)
            current.wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._padded_prefill(hidden, slot, last)
            self._pool = graph.pool()
        except Exception as error:  # noqa: BLE001 -- raise (strict) or prefill this width eagerly from now on
            self.errors[("prefill", width)] = f"{type(error).__name__}: {str(error)[:1000]}"
            sync(self.device)
            if self.strict:
                raise FastPathError(f"batched prefill graph {width}", self.errors[("prefill", width)]) from error
            if self.on_fallback is not None:
                self.on_fallback("batched prefill graph", f"width {width} prefills eagerly; "
                                 f"{self.errors[('prefill', width)][:300]}")
            return None
        entry = (graph, hidden, slot, last, logits)
        self._prefill_graphs[width] = entry
        return entry

    def _scratch_slot(self):
        """A slot whose cache the warm-up runs may write: the highest (handed out last; its writes before it
        runs anything are overwritten by its own prefill)."""
        return self.max_slots - 1

    def _decode(self, slots):
        """One decode step for the running `slots` -> their next tokens (len(slots),)."""
        rows = min(self.max_slots, 1 << max(slots).bit_length())  # [0, rows): a power of two covering them
        kv_len = min(self.max_len, round_up(max(self._length[s] for s in slots) + 1, CACHE_ALIGN))
        if self.cuda_graph and (rows, kv_len) not in self.errors:
            logits = self._graph_logits(rows, kv_len)
        else:
            logits = self._decode_logits(rows, kv_len)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        tokens = self._select(logits.index_select(0, index), [self._running[s] for s in slots])  # (n,)
        self._ids[index] = tokens  # the next step's inputs
        self._pos[index] += 1
        return tokens

    def _decode_logits(self, rows, kv_len):
        """Device-side only (what a decode graph captures): slots [0, rows) one token each -> (rows, vocab)."""
        ids, positions = self._ids[:rows], self._pos[:rows]
        hidden = self.body.embed_tokens(ids)[:, None]  # (rows, 1, hidden)
        hidden = self._layers(hidden, positions[:, None], self._rows[:rows], kv_len=kv_len)  # (rows, 1, hidden)
        return self._logits(hidden[:, 0])  # (rows, vocab)

    def _graph_logits(self, rows, kv_len):
        entry = self._graphs.get((rows, kv_len))
        if entry is None:
            try:
                entry = self._capture(rows, kv_len)
            except Exception as error:  # noqa: BLE001 -- raise (strict) or run this shape eagerly from now on
                self.errors[(rows, kv_len)] = f"{type(error).__name__}: {str(error)[:1000]}"
                sync(self.device)
                if self.strict:
                    raise FastPathError(f"batched decode graph {rows}x{kv_len}", self.errors[(rows, kv_len)]) from error
                if self.on_fallback is not None:
                    self.on_fallback("batched decode graph", f"{rows} rows x {kv_len} keys run eagerly; "
                                     f"{self.errors[(rows, kv_len)][:300]}")
                return self._decode_logits(rows, kv_len)
        graph, logits = entry
        graph.replay()
        return logits

    def _capture(self, rows, kv_len):
        """Record the decode step of this shape. The warm-up calls write K/V only where this very step
        writes next (each row's own position, or the scratch position), so they change no answer."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            for _ in range(2):
                self._decode_logits(rows, kv_len)
        current.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._decode_logits(rows, kv_len)
        self._pool = graph.pool()
        self._graphs[(rows, kv_len)] = (graph, logits)
        return graph, logits

    def _layers(self, hidden, positions, slots, kv_len):
        """The LLaMA stack over `hidden` (B, Q, hidden) at `positions` (B, Q) of cache rows `slots` (B,),
        writing each token's K/V at (slot, position). kv_len None: a prefill from position 0, attending its
        own keys causally; else one token per row attending its slot's keys [0, kv_len) up to its position."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        batch, width = hidden.shape[:2]
        hd = self.head_dim
        cos, sin = self.body.rotary_emb(hidden, positions)  # (B, Q, hd) each
        mask = None
        if kv_len is not None:
            mask = (self._key_slots[:kv_len][None] <= positions).view(batch, 1, width, kv_len)  # (B, 1, 1, L)
        where = (slots[:, None], slice(None), positions)  # K/V cache [slot, :, position] for every token
        for layer, keys, values in zip(self.body.layers, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, width, -1, hd).transpose(1, 2)  # (B, heads, Q, hd)
            k = attn.k_proj(x).view(batch, width, -1, hd).transpose(1, 2)  # (B, kv heads, Q, hd)
            v = attn.v_proj(x).view(batch, width, -1, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys[where] = k.transpose(1, 2)  # (B, Q, kv heads, hd) into the slots
            values[where] = v.transpose(1, 2)
            if kv_len is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.gqa)
            else:
                out = F.scaled_dot_product_attention(q, keys[:batch, :, :kv_len], values[:batch, :, :kv_len],
                                                     attn_mask=mask, scale=self.scaling, enable_gqa=self.gqa)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, width, -1))  # (B, Q, hidden)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    def _logits(self, hidden):
        """(B, hidden) final hidden states -> (B, vocab) logits."""
        return self.model.lm_head(self.body.norm(hidden))

    def _select(self, logits, requests):
        """(n, vocab) logits of `requests` -> (n,) tokens: argmax, or sampled for rows with temperature > 0."""
        tokens = logits.argmax(dim=-1)  # (n,)
        sampled = [i for i, r in enumerate(requests) if r.temperature > 0]
        if not sampled:
            return tokens
        index = torch.tensor(sampled, device=self.device)
        scale = torch.tensor([requests[i].temperature for i in sampled], device=self.device)
        probs = torch.softmax(logits.index_select(0, index).float() / scale[:, None], dim=-1)  # (m, vocab)
        top_p = torch.tensor([requests[i].top_p or 1.0 for i in sampled], device=self.device)
        if bool((top_p < 1).any()):
            probs = _nucleus(probs, top_p)
        draws = torch.multinomial(probs, 1, generator=self.generator)[:, 0]  # (m,)
        return tokens.index_copy(0, index, draws)


def _nucleus(probs, top_p):
    """(m, vocab) probabilities -> the same, kept to each row's smallest set of top tokens reaching top_p."""
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the tokens ranked above each
    ordered = ordered.masked_fill(before >= top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter(-1, order, ordered)


def kv_bytes_per_token(config, dtype_bytes):
    """Key + value bytes one token takes in the LLM's cache, over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def kv_bytes_per_slot(config, max_len, dtype):
    """Bytes one slot of a `BatchDecoder` cache takes for a model of `config` (K and V, every layer)."""
    return round_up(max_len) * kv_bytes_per_token(config, torch.empty((), dtype=dtype).element_size())

