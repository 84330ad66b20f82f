"""Triton kernels for the GPU paths where the stock kernels leave bandwidth or compute unused.

- `gemv`: the decode step's matrix-vector products at batch 1. A step reads all 13 GB of weights
  once, so it is bound by memory bandwidth, of which the cuBLAS products leave part unused. The
  kernel also folds in the element-wise work around each product, which would otherwise be a kernel
  launch of its own: the input's RMSNorm (its 1/rms is one scalar, so it is accumulated beside the
  product and applied at the end), SiLU(gate) * up of a gate/up vector, and the residual add.
- `linear_quick_gelu`: CLIP's fc1 product with its bias and QuickGELU in the epilogue, so the
  (tokens, 4096) activation is written once, instead of written, read and written again by a separate
  element-wise kernel.
- `attention`: CLIP's attention straight from the fused q/k/v projection, with the class token's key
  taken apart so that the 256 patch keys fill whole tiles (SDPA's kernels pay a third tile of 128 keys
  for the 257th). docs/benchmarks.md has each kernel's timings.

All need Triton; `usable` says whether they are the default for a tensor (a CUDA one). On a machine
without a GPU, Triton's interpreter (`TRITON_INTERPRET=1` before Triton is imported) runs them on CPU
tensors when asked for explicitly; the CPU tests do that.
"""

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # CPU-only installs: the callers keep their PyTorch paths
    triton = tl = None


def usable(tensor):
    """Whether these kernels are installed and compiled for `tensor`'s device (CUDA)."""
    return triton is not None and tensor.is_cuda


def _require(name):
    if triton is None:
        raise ImportError(f"{name} is a Triton kernel: pip install triton (CUDA builds of PyTorch bring it)")


if triton is not None:

    @triton.jit
    def _int8_values(w):
        """int8 -> float32 by integer arithmetic, not I2F (a conversion the multiprocessor runs at an eighth of
        its add rate, which would bound the int8 products below the memory's bandwidth): the bits 0x4B000000
        + (q + 128) are the float 2^23 + 128 + q, exactly; subtracting 2^23 + 128 leaves q."""
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _nibble_values(packed):
        """A packed int4 tile (uint8) -> (its low nibbles, its high nibbles) as float32, by the same integer
        trick as `_int8_values`: (p & 0xF) | 0x4B000000 is the float 2^23 + low, (p & 0xF0) | 0x4B000000 is
        2^23 + 16 high, both exact."""
        p = packed.to(tl.int32)
        low = ((p & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        high = ((p & 0xF0) | 0x4B000000).to(tl.float32, bitcast=True) * 0.0625 - 524288.0
        return low, high

    @triton.jit
    def _tile_values(tile, ok, EVEN: tl.constexpr, SCALED: tl.constexpr):
        """A weight tile (bf16/fp32, or int8 with SCALED) as float32, read once (evict first)."""
        if EVEN:
            w = tl.load(tile, eviction_policy="evict_first")
        else:
            w = tl.load(tile, mask=ok, other=0, eviction_policy="evict_first")
        if SCALED:
            return _int8_values(w)
        return w.to(tl.float32)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, residual_ptr, scale_ptr, n, eps, k: tl.constexpr,
                     NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr, SCALED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, STAGES: tl.constexpr,
                     PAIRED: tl.constexpr):
        # SCALED: w holds int8 values, row r of the real weight being scale[r] * w[r] (one scale per output
        # channel factors out of the row's sum). STAGES > 1: the loop's loads are software-pipelined (the
        # next tiles in flight while this one is summed). PAIRED: w has 2n rows [gate; up] and the n outputs
        # are silu(gate) * up (the next product then reads its input as it is)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        paired = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in tl.range(0, k, BLOCK_K, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < k
            if EVEN:
                x = tl.load(x_ptr + cols).to(tl.float32)
            else:
                x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if GATED:  # x holds [gate | up]: the product's input is silu(gate) * up
                if EVEN:
                    up = tl.load(x_ptr + k + cols).to(tl.float32)
                else:
                    up = tl.load(x_ptr + k + cols, mask=col_ok, other=0.0).to(tl.float32)
                x = x * tl.sigmoid(x) * up
            if NORM:  # RMSNorm's weight now, its 1/rms after the sum
                squares += x * x
                if EVEN:
                    x = x * tl.load(norm_ptr + cols).to(tl.float32)
                else:
                    x = x * tl.load(norm_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            tile = w_ptr + rows[:, None] * k + cols[None, :]
            acc += _tile_values(tile, row_ok[:, None] & col_ok[None, :], EVEN, SCALED) * x[None, :]
            if PAIRED:
                paired += _tile_values(tile + n * k, row_ok[:, None] & col_ok[None, :], EVEN, SCALED) * x[None, :]
        y = tl.sum(acc, axis=1)
        up = tl.sum(paired, axis=1)
        if SCALED:
            y = y * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            if PAIRED:
                up = up * tl.load(scale_ptr + n + rows, mask=row_ok, other=0.0).to(tl.float32)
        if NORM:
            inverse_rms = tl.rsqrt(tl.sum(squares, axis=0) / k + eps)
            y = y * inverse_rms
            up = up * inverse_rms
        if PAIRED:
            y = y * tl.sigmoid(y) * up
        if RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _linear_quick_gelu_kernel(a_desc, w_desc, bias_ptr, out_desc, m, n, programs, k: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr, STAGES: tl.constexpr, PRECISION: tl.constexpr):
        # persistent: `programs` programs (one per multiprocessor) walk the output tiles; tiles go in groups
        # of GROUP_M tile rows so the tiles computed at once share their A rows and W columns in L2.
        # Tiles move by TMA (tensor descriptors), which zero-fills loads and clips stores at the edges.
        tiles_m, tiles_n = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
        per_group = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs):
            first_m = (tile // per_group) * GROUP_M
            group_m = min(tiles_m - first_m, GROUP_M)
            row = (first_m + (tile % per_group) % group_m) * BLOCK_M
            col = ((tile % per_group) // group_m) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.range(0, k // BLOCK_K, num_stages=STAGES):
                acc = tl.dot(a_desc.load([row, i * BLOCK_K]), w_desc.load([col, i * BLOCK_K]).T, acc,
                             input_precision=PRECISION)
            cols = col + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
            acc = acc * tl.sigmoid(1.702 * acc)
            out_desc.store([row, col], acc.to(out_desc.dtype))

    @triton.jit
    def _attention_kernel(qkv_ptr, out_ptr, n, SCALE: tl.constexpr, heads: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, PRECISION: tl.constexpr):
        # one program: BLOCK_M query rows of one (image, head). qkv rows are [q | k | v], each heads x HEAD_DIM
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        image, head = tl.program_id(1) // heads, tl.program_id(1) % heads
        width = heads * HEAD_DIM
        dims = tl.arange(0, HEAD_DIM)
        base = qkv_ptr + image.to(tl.int64) * n * 3 * width + head * HEAD_DIM
        row_ok = rows < n
        q = tl.load(base + rows[:, None] * 3 * width + dims[None, :], mask=row_ok[:, None], other=0.0)
        scale: tl.constexpr = SCALE * 1.4426950408889634  # scores in log2 units: exp2 below
        # token 0 (CLIP's class token) as a vector, which starts every row's running softmax: the other
        # n - 1 keys then come in whole blocks (256 = 2 x 128), where a 257-key tile loop pays a third block
        k0 = tl.load(base + width + dims).to(tl.float32)
        v0 = tl.load(base + 2 * width + dims).to(tl.float32)
        top = tl.sum(q.to(tl.float32) * k0[None, :], axis=1) * scale  # running max of each row's scores
        total = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)  # running sum of exp2(score - top)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32) + v0[None, :]
        for start in range(1, n, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < n
            if EVEN:
                k = tl.load(base + width + keys[:, None] * 3 * width + dims[None, :])
                v = tl.load(base + 2 * width + keys[:, None] * 3 * width + dims[None, :])
            else:
                k = tl.load(base + width + keys[:, None] * 3 * width + dims[None, :], mask=key_ok[:, None], other=0.0)
                v = tl.load(base + 2 * width + keys[:, None] * 3 * width + dims[None, :], mask=key_ok[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_N)
            if not EVEN:
                scores = tl.where(key_ok[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            weights = tl.math.exp2(scores - new_top[:, None])
            shrink = tl.math.exp2(top - new_top)
            total = total * shrink + tl.sum(weights, axis=1)
            acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            top = new_top
        out = out_ptr + image.to(tl.int64) * n * width + rows[:, None] * width + head * HEAD_DIM + dims[None, :]
        tl.store(out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _input_half(x_ptr, norm_ptr, cols, k: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr):
        """The product's input at columns `cols` (half a group: what one nibble of a packed row holds),
        gated, and scaled by the norm weight -> (input, its squares before the norm weight). x is small
        and cached: its loads are always masked."""
        ok = cols < k
        x = tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        if GATED:  # x holds [gate | up]
            x = x * tl.sigmoid(x) * tl.load(x_ptr + k + cols, mask=ok, other=0.0).to(tl.float32)
        squares = x * x
        if NORM:
            x = x * tl.load(norm_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        return x, squares

    @triton.jit
    def _int4_tile_sums(tile, scales, zeros, ok, low_x, high_x, x_sums, EVEN: tl.constexpr):
        """One (BLOCK_N, GROUPS, HALF) packed tile against its inputs -> (scale * q * x element-wise, zero * X_g
        per row and group); `ok` (BLOCK_N, GROUPS) masks it when not EVEN."""
        if EVEN:
            packed = tl.load(tile, eviction_policy="evict_first")
            scale = tl.load(scales).to(tl.float32)
            zero = tl.load(zeros).to(tl.float32)
        else:
            packed = tl.load(tile, mask=ok[:, :, None], other=0, eviction_policy="evict_first")
            scale = tl.load(scales, mask=ok, other=0.0).to(tl.float32)
            zero = tl.load(zeros, mask=ok, other=0.0).to(tl.float32)
        low, high = _nibble_values(packed)
        return scale[:, :, None] * (low * low_x[None, :, :] + high * high_x[None, :, :]), zero * x_sums[None, :]

    @triton.jit
    def _gemv_int4_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, norm_ptr, residual_ptr, n, eps,
                          k: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
                          RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, EVEN: tl.constexpr,
                          STAGES: tl.constexpr, PAIRED: tl.constexpr):
        # w: (n, k / 2) bytes. Group g of a row (GROUP columns) is HALF = GROUP / 2 bytes: byte c holds
        # column g * GROUP + c in its low nibble and g * GROUP + HALF + c in its high one, so that both halves
        # read contiguous inputs. The real weight is q * scale[r, g] + zero[r, g], so a row's sum is
        # sum_g scale[r, g] * sum_{c in g} q_c x_c + zero[r, g] * X_g, X_g the group's input sum (one number
        # for all rows): per weight, one product and a scaled add, the zeros once per group.
        # A program takes BLOCK_N rows and GROUPS groups per iteration as one (BLOCK_N, GROUPS, HALF) tile:
        # the threads spread over (groups, bytes), so each holds several rows and the input's work (norm,
        # gating) is shared by them. STAGES > 1: the loads are software-pipelined. PAIRED: as in _gemv_kernel
        # (2n rows [gate; up], n outputs silu(gate) * up)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        HALF: tl.constexpr = GROUP // 2
        groups: tl.constexpr = k // GROUP
        half = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_N, GROUPS, HALF), dtype=tl.float32)
        offsets = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, GROUPS, HALF), dtype=tl.float32)
        offsets_up = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
        squares = tl.zeros((GROUPS, HALF), dtype=tl.float32)
        for first in tl.range(0, groups, GROUPS, num_stages=STAGES):
            g = first + tl.arange(0, GROUPS)
            cols = g[:, None] * GROUP + half[None, :]  # (GROUPS, HALF): the low nibbles' columns
            low_x, sq = _input_half(x_ptr, norm_ptr, cols, k, NORM, GATED)
            squares += sq
            high_x, sq = _input_half(x_ptr, norm_ptr, cols + HALF, k, NORM, GATED)
            squares += sq
            tile = w_ptr + rows[:, None, None] * (k // 2) + (g[:, None] * HALF + half[None, :])[None, :, :]
            at = rows[:, None] * groups + g[None, :]  # (BLOCK_N, GROUPS): scales and zeros
            ok = row_ok[:, None] & (g < groups)[None, :]
            x_sums = tl.sum(low_x, axis=1) + tl.sum(high_x, axis=1)
            part, offset = _int4_tile_sums(tile, scale_ptr + at, zero_ptr + at, ok, low_x, high_x, x_sums, EVEN)
            acc += part
            offsets += offset
            if PAIRED:
                part, offset = _int4_tile_sums(tile + n * (k // 2), scale_ptr + n * groups + at,
                                               zero_ptr + n * groups + at, ok, low_x, high_x, x_sums, EVEN)
                acc_up += part
                offsets_up += offset
        y = tl.sum(tl.sum(acc, axis=2), axis=1) + tl.sum(offsets, axis=1)
        up = tl.sum(tl.sum(acc_up, axis=2), axis=1) + tl.sum(offsets_up, axis=1)
        if NORM:
            inverse_rms = tl.rsqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / k + eps)
            y = y * inverse_rms
            up = up * inverse_rms
        if PAIRED:
            y = y * tl.sigmoid(y) * up
        if RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _qmatmul_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, m, n, k: tl.constexpr, INT4: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
        # x (m, k) times a quantized (n, k) weight transposed -> (m, n): weight tiles dequantized in registers
        # to x's dtype, then tl.dot. int8: (n, k) values, one scale per row, applied after the sum.
        # int4: packed as in _gemv_int4_kernel; each group is two products of half its width (the low
        # nibbles times the group's first half of x, the high ones times its second half)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, out_ok = rows < m, outs < n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if INT4:
            HALF: tl.constexpr = GROUP // 2
            groups: tl.constexpr = k // GROUP
            half = tl.arange(0, HALF)
            for g in range(0, groups):
                x_at = x_ptr + rows[:, None] * k + (g * GROUP + half)[None, :]
                first = tl.load(x_at, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HALF)
                second = tl.load(x_at + HALF, mask=row_ok[:, None], other=0.0)
                packed = tl.load(w_ptr + outs[:, None] * (k // 2) + (g * HALF + half)[None, :], mask=out_ok[:, None],
                                 other=0)
                scale = tl.load(scale_ptr + outs * groups + g, mask=out_ok, other=0.0).to(tl.float32)[:, None]
                zero = tl.load(zero_ptr + outs * groups + g, mask=out_ok, other=0.0).to(tl.float32)[:, None]
                low, high = _nibble_values(packed)  # (BLOCK_N, HALF)
                low = (low * scale + zero).to(first.dtype)
                high = (high * scale + zero).to(first.dtype)
                acc = tl.dot(first, tl.trans(low), acc, input_precision=PRECISION)
                acc = tl.dot(second, tl.trans(high), acc, input_precision=PRECISION)
        else:
            for start in range(0, k, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                col_ok = cols < k
                a = tl.load(x_ptr + rows[:, None] * k + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                            other=0.0)
                w = tl.load(w_ptr + outs[:, None] * k + cols[None, :], mask=out_ok[:, None] & col_ok[None, :],
                            other=0)
                acc = tl.dot(a, tl.trans(_int8_values(w).to(a.dtype)), acc, input_precision=PRECISION)
            acc = acc * tl.load(scale_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows[:, None] * n + outs[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])

def gemv_config(n, k, element_size=2):
    """(BLOCK_N, BLOCK_K, num_warps, stages) of the matrix-vector kernel for an (n, k) weight: the fastest of
    a sweep for each 7B shape (bf16 on an H100, int8 on an H200; docs/benchmarks.md)."""
    if n * k <= 1 << 20:  # small matrices (tiny models, the CPU tests): 16 rows a program, few programs
        return 16, 1024, 4, 1
    if element_size == 1:  # int8
        if k > 8192:  # down_proj (4096 x 11008 = 43 x 256, no masks)
            return 4, 256, 8, 1
        if n <= 4096:  # o_proj
            return 8, 1024, 4, 1
        return (4, 1024, 4, 1) if n <= 16384 else (16, 512, 8, 1)
    if k > 8192:  # down_proj (4096 x 11008): short blocks along k (11008 = 43 x 256, no masks)
        return 4, 256, 8, 1
    if n <= 4096:  # o_proj: two rows a program, to have enough programs in flight
        return 2, 1024, 4, 1
    return 8, 1024, 4, 1


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the fc1 kernel: the fastest of 10 on an
# H100 for CLIP-L's fc1 at batch 256 (docs/benchmarks.md)
LINEAR_CONFIG = (128, 256, 64, 8, 8, 3)


def _precision(dtype):
    """tl.dot's input precision: fp32 inputs stay fp32 (Triton would round them to TF32 on the GPU)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def multiprocessors(device):
    """How many programs the persistent fc1 kernel runs on `device` (its multiprocessors; 4 for the CPU
    interpreter). Look it up once, outside any compiled code, and pass it to `linear_quick_gelu` as
    `programs` (`FastVisionEncoder` keeps it)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gemv_int4_config(n, k, group_size=128):
    """(BLOCK_N, GROUPS, num_warps, stages) of the int4 matrix-vector kernel for an (n, k) weight: a
    (BLOCK_N, GROUPS, group_size / 2)-byte tile per iteration (GROUPS a power of two; a last partial
    iteration is masked). The fastest of a sweep on an H200 for each 7B shape (docs/benchmarks.md)."""
    if n * k <= 1 << 20:  # small matrices (tiny models, the CPU tests)
        return 16, 2, 2, 1
    if n <= 4096 and k <= 4096:  # o_proj
        return 16, 8, 4, 1
    return (8, 4, 1, 2) if n > 30000 else (8, 8, 2, 2)


def _check_quantized(name, weight, scales, zeros, group_size, n_k):
    """(n, k) of a quantized weight, checked: int8 (n, k) with (n,) scales, or uint8 (n, k / 2) with
    (n, k / group_size) scales and zeros."""
    n = weight.shape[0]
    if weight.dtype == torch.int8:
        k = weight.shape[1]
        if scales.shape != (n,) or zeros is not None:
            raise ValueError(f"{name}: an int8 ({n}, {k}) weight takes ({n},) scales and no zeros")
    elif weight.dtype == torch.uint8:
        k = 2 * weight.shape[1]
        if group_size is None or group_size < 32 or group_size & (group_size - 1) or k % group_size:
            raise ValueError(f"{name}: int4 group size {group_size} must be a power of two >= 32 dividing {k}")
        groups = (n, k // group_size)
        if zeros is None or scales.shape != groups or zeros.shape != groups:
            raise ValueError(f"{name}: an int4 ({n}, {k}) weight in groups of {group_size} takes {groups} "
                             "scales and zeros")
    else:
        raise ValueError(f"{name}: a quantized weight is int8 or packed uint8, not {weight.dtype}")
    if not weight.is_contiguous() or not scales.is_contiguous() or zeros is not None and not zeros.is_contiguous():
        raise ValueError(f"{name}: the weight, scales and zeros must be contiguous")
    if n_k is not None and n_k != k:
        raise ValueError(f"{name}: {n_k} input values for a ({n}, {k}) weight")
    return n, k


def gemv(x, weight, norm=None, eps=0.0, gated=False, residual=None, config=None, scales=None, zeros=None,
         group_size=None, paired=False):
    """`weight` (N, K) times one vector -> (N,) in `weight`'s dtype (in x's for a quantized weight).

    x: K values (any shape), or 2K values [gate | up] with `gated` (the input is silu(gate) * up).
    paired: the weight's rows are [gate; up] (N even) and the result is silu(gate) * up, N / 2 values (a
    gate/up product whose output is the next product's input as it is).
    norm: an RMSNorm weight (K,): the input is first RMS-normalised with `eps` and scaled by it.
    residual: N values added to the result.
    scales (and zeros): a quantized weight. int8 `weight` (N, K) with per-row `scales` (N,): the weight is
    scales[:, None] * weight. Packed int4 `weight` uint8 (N, K / 2) with `scales`, `zeros` (N, K / group_size):
    weight = q * scale + zero per group; a group's byte c holds its column c in the low nibble and column
    c + group_size / 2 in the high one.
    config: (BLOCK_N, BLOCK_K, num_warps[, stages]), for int4 (BLOCK_N, groups per iteration (a power of two),
    num_warps[, stages]); stages > 1 software-pipelines the loads.
    """
    _require("gemv")
    x = x.reshape(-1)
    if scales is not None and weight.dtype == torch.uint8:
        n, k = _check_quantized("gemv", weight, scales, zeros, group_size, x.numel() // (2 if gated else 1))
        if x.numel() != (2 * k if gated else k):
            raise ValueError(f"gemv: {x.numel()} input values for a ({n}, {k}) weight (gated={gated})")
        block_n, groups, warps, stages = (*(config or gemv_int4_config(n, k, group_size)), 1)[:4]
        outputs = _outputs("gemv", n, paired, residual)
        out = torch.empty(outputs, device=weight.device, dtype=x.dtype)
        _gemv_int4_kernel[(triton.cdiv(outputs, block_n),)](
            x, weight, scales, zeros, out, x if norm is None else norm, x if residual is None else residual.reshape(-1),
            outputs, float(eps), k=k, GROUP=group_size, NORM=norm is not None, GATED=gated,
            RESIDUAL=residual is not None, BLOCK_N=block_n, GROUPS=groups,
            EVEN=outputs % block_n == 0 and (k // group_size) % groups == 0, STAGES=stages, PAIRED=paired,
            num_warps=warps)
        return out
    n, k = weight.shape
    if x.numel() != (2 * k if gated else k):
        raise ValueError(f"gemv: {x.numel()} input values for a ({n}, {k}) weight (gated={gated})")
    if scales is not None:
        _check_quantized("gemv", weight, scales, zeros, group_size, k)
    if weight.stride() != (k, 1):
        raise ValueError("gemv: the weight must be contiguous (rows of K values)")
    if n * k >= 2 ** 31:
        raise ValueError(f"gemv: a ({n}, {k}) weight is too large for 32-bit offsets")
    block_n, block_k, warps, stages = (*(config or gemv_config(n, k, weight.element_size())), 1)[:4]
    block_k = min(block_k, triton.next_power_of_2(k))
    outputs = _outputs("gemv", n, paired, residual)
    out = torch.empty(outputs, device=weight.device, dtype=weight.dtype if scales is None else x.dtype)
    _gemv_kernel[(triton.cdiv(outputs, block_n),)](
        x, weight, out, x if norm is None else norm, x if residual is None else residual.reshape(-1),
        x if scales is None else scales, outputs, float(eps), k=k, NORM=norm is not None, GATED=gated,
        RESIDUAL=residual is not None, SCALED=scales is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN=outputs % block_n == 0 and k % block_k == 0, STAGES=stages, PAIRED=paired,
        num_warps=warps)
    return out


def _outputs(name, n, paired, residual):
    """How many values a product of n weight rows writes (n / 2 when `paired`), checked with its residual."""
    if paired and n % 2:
        raise ValueError(f"{name}: a paired [gate; up] weight has an even number of rows, not {n}")
    outputs = n // 2 if paired else n
    if residual is not None and residual.numel() != outputs:
        raise ValueError(f"{name}: a residual of {residual.numel()} values for {outputs} outputs")
    return outputs


def qmatmul_config(m, n=None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the quantized matrix product for m rows of an
    n-output weight: m = 32 is a question after the kept prefix (the fastest of a sweep on an H200), hundreds
    a prompt prefill."""
    if m <= 32:
        return (16, 64, 128, 4, 4) if n is not None and n <= 4096 else (32, 64, 256, 4, 3)
    return 64, 64, 128, 4, 3


def qmatmul(x, weight, scales, zeros=None, group_size=None, config=None):
    """x (..., K) times a quantized (N, K) weight (as `gemv` reads it) transposed -> (..., N) in x's dtype:
    the weight's tiles are dequantized in registers and multiplied with tl.dot (prefill: several tokens)."""
    _require("qmatmul")
    n, k = _check_quantized("qmatmul", weight, scales, zeros, group_size, x.shape[-1])
    a = x.reshape(-1, k).contiguous()
    m = a.shape[0]
    block_m, block_n, block_k, warps, stages = config or qmatmul_config(m, n)
    if m * max(n, k) >= 2 ** 31:
        raise ValueError(f"qmatmul: ({m}, {k}) x ({n}, {k}) is too large for 32-bit offsets")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    int4 = weight.dtype == torch.uint8
    _qmatmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        a, weight, scales, scales if zeros is None else zeros, out, m, n, k=k, INT4=int4,
        GROUP=group_size if int4 else 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], n)


def linear_quick_gelu(x, weight, bias, config=None, programs=None):
    """quick_gelu(x @ weight.T + bias) for x (..., K), weight (N, K), bias (N,) -> (..., N).

    programs: the persistent kernel's program count (`multiprocessors(x.device)`, looked up here if None).
    K must be a multiple of the config's BLOCK_K (64 by default; CLIP's 1024 is) or a power of two below it.
    """
    _require("linear_quick_gelu")
    n, k = weight.shape
    block_m, block_n, block_k, group_m, warps, stages = config or LINEAR_CONFIG
    if x.element_size() > 2:  # fp32: smaller tiles, to fit the stages and the output tile in shared memory
        block_n, block_k = min(block_n, 128), min(block_k, 32)
    block_k = min(block_k, k)
    if x.shape[-1] != k or k % block_k or block_k & (block_k - 1) or block_k < 16:
        raise ValueError(f"linear_quick_gelu: input width {x.shape[-1]} against a ({n}, {k}) weight "
                         f"(K must be a multiple of {block_k}, a power of two >= 16)")
    if weight.stride() != (k, 1) or not torch.compiler.is_compiling() and weight.data_ptr() % 16:
        raise ValueError("linear_quick_gelu: the weight must be contiguous and 16-byte aligned (TMA reads it)")
    a = x.reshape(-1, k).contiguous()
    m = a.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    programs = multiprocessors(x.device) if programs is None else programs
    grid = min(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), programs)
    _linear_quick_gelu_kernel[(grid,)](
        TensorDescriptor.from_tensor(a, [block_m, block_k]), TensorDescriptor.from_tensor(weight, [block_n, block_k]),
        bias, TensorDescriptor.from_tensor(out, [block_m, block_n]), m, n, grid, k=k, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=group_m, STAGES=stages, PRECISION=_precision(x.dtype), num_warps=warps,
        num_stages=stages)
    return out.view(*x.shape[:-1], n)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the attention kernel: the fastest of 10 on an H100 for
# CLIP-L at batch 256 ((64, 64) as fast, but rounds more)
ATTENTION_CONFIG = (64, 128, 4, 2)


def attention(qkv, heads, scale, config=None):
    """Multi-head attention without a mask straight from a fused projection: qkv (B, N, 3 * heads * hd),
    each token [q | k | v] with the heads side by side -> (B, N, heads * hd), the heads side by side
    again (what the output projection reads). Token 0's key is taken apart from the others (see the
    kernel); the result is plain softmax(q k^T * scale) v."""
    _require("attention")
    b, n, three_width = qkv.shape
    head_dim = three_width // (3 * heads)
    if three_width != 3 * heads * head_dim or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"attention: {three_width} values per token are not q, k, v of {heads} heads "
                         "of a power-of-two size >= 16")
    block_m, block_n, warps, stages = config or ATTENTION_CONFIG
    qkv = qkv.contiguous()
    out = torch.empty(b, n, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    _attention_kernel[(triton.cdiv(n, block_m), b * heads)](
        qkv, out, n, SCALE=float(scale), heads=heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        EVEN=(n - 1) % block_n == 0, PRECISION=_precision(qkv.dtype),
        num_warps=warps, num_stages=stages)
    return out
