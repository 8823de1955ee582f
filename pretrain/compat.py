"""Let megatron-core's CUDA-only code paths run on CPU (gloo), and do nothing when CUDA is present.

megatron-core allocates buffers with `device=torch.cuda.current_device()`, keeps its RNG tracker on the CUDA
generator and calls `torch.cuda.synchronize()`. None of that has a CPU fallback upstream, so on a machine
without CUDA we point those calls at the CPU (docs/FINDINGS.md, "megatron-core on CPU").
This is the only place that knows about it; everything else is device-agnostic.
"""
import torch

_applied = False


def apply_cpu_compat() -> bool:
    """Patch once; returns True when the CPU shim is active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly, no recursion.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None

    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as mt_utils

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def causal_mask(sq, skv=None):
        skv = sq if skv is None else skv
        return torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=1 + skv - sq)

    mt_utils.get_default_causal_mask = lambda sq: causal_mask(sq)
    _moe_dispatcher_on_cpu()
    # DeepSpeed 0.19.8's CPU backend JIT-loads its shared-memory all-reduce op in every rank at init
    # (deepspeed/comm/torch.py, build_shm_op) for inference_all_reduce alone, which training never calls. Each load
    # takes the build's lock file in turn, builds in a fresh environment (two ranks building at once fail), rebuilds
    # whenever another venv built it last, and hangs on a lock a killed build left (launch/op_builds.py): hazards for
    # nothing. Marked incompatible, build_shm_op returns None and every collective stays torch's (docs/FINDINGS.md).
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _applied = True
    return True


def _moe_dispatcher_on_cpu() -> None:
    """megatron-core 0.16.1's all-to-all token dispatcher (MoE, pretrain/moe.py) creates a CUDA side stream when
    built and copies its split sizes to the host on it (token_dispatcher.py, _maybe_dtoh_and_synchronize). On the
    CPU the tensors are already on the host: the side stream is a placeholder never used, and the copy becomes the
    conversion to numpy the GPU path ends with."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    def dtoh_on_cpu(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for attr in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, attr, None)
                if torch.is_tensor(value):
                    setattr(self, attr, value.numpy())
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "cpu: no side stream"
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh_on_cpu
    _uneven_sequence_parallel_on_gloo()


def _uneven_sequence_parallel_on_gloo() -> None:
    """Under TP with sequence parallelism the MoE dispatcher all-gathers and reduce-scatters tokens in parts of
    different sizes across the TP ranks (megatron's tensor_parallel.mappings with output/input_split_sizes); gloo's
    all_gather needs equal sizes and it has no list reduce_scatter. The same results from what gloo has: an
    all-gather of parts padded to the largest, and an all-reduce of which each rank keeps its part."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        most = max(output_split_sizes)
        padded = input_.new_zeros((most, *input_.shape[1:]))
        padded[:input_.size(0)] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        dist.all_reduce(total, group=group)
        return total.split(input_split_sizes, dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


def device() -> torch.device:
    """The device this rank computes on (its local GPU, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def defer_deepspeed_muon_compile() -> None:
    """DeepSpeed 0.19.8 imports its Muon optimizer in every engine (zero/utils.py is_zero_supported_optimizer,
    stage3.py, stage_1_and_2.py, bf16_optimizer.py: to ask `isinstance(optimizer, MuonWithAuxAdam)`), and that import
    decorates three functions with torch.compile, which imports torch._inductor: 2.0 s per rank of a 2-rank CPU
    launch, 1.2-1.4 s of it inductor (the rest is torch._dynamo, which torch.optim imports anyway; cProfile,
    2026-12-03, docs/FINDINGS.md), in every launch, for an optimizer we never build. Imported here first with
    DeepSpeed's compile() returning a decorator that calls torch.compile on the function's first call, Muon
    behaves as shipped if anyone uses it and nobody pays for it otherwise. GPU and CPU alike."""
    import functools
    import sys

    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler

    def lazy_compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def first_call_compiles(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)

            return first_call_compiles

        return decorate

    shipped = compiler.compile
    compiler.compile = lazy_compile
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (and original_muon, decorated lazily)
    finally:
        compiler.compile = shipped
