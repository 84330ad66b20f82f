"""Small CUDA helpers shared by the fast CLIP encoder, the greedy decoder and the benchmarks."""

import gc

import torch


def sync(device):
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    """Collect garbage and hand the allocator's cached blocks back to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def capture_graph(fn, device, warmup=3, pool=None, before_each=None, stream=None):
    """Warm `fn` up on a side stream (allocations, lazy init, compilation happen there), then record one
    call of it into a `torch.cuda.CUDAGraph` -> (graph, what the recorded call returned). `before_each`
    runs before every warm-up call and before the recording (e.g. resetting a cache position);
    `pool`: share another graph's memory pool (graphs that never run at once).

    `stream`: the side stream to warm up on. Pass one kept stream for all captures (`FastPath` owns one):
    cuBLAS keeps a 32 MiB workspace for every stream it has run on, for the life of the process, so a
    new stream per capture (what None gives) costs that much each time.

    `device` need not be the current card (a vision tower on `--vision-device`): the capture runs with it current,
    and records on `stream` when torch's own capture stream (one per process, made on the card of the first
    capture) is on another card."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device) if stream is None else stream
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                if before_each is not None:
                    before_each()
                fn()
        current.wait_stream(side)
        if before_each is not None:
            before_each()
        graph = torch.cuda.CUDAGraph()
        default = torch.cuda.graph.default_capture_stream
        capture = side if default is not None and default.device != side.device else None
        with torch.cuda.graph(graph, pool=pool, stream=capture):  # records; nothing runs
            out = fn()
    return graph, out
