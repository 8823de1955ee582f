"""Parallel layout: validate it, start torch.distributed, build megatron-core's groups, adapt them for DeepSpeed.

Rank order is megatron's and DeepSpeed's pipeline topology's alike: tensor-parallel fastest, then context, then
data, then pipeline. So megatron's TP/CP/DP groups and DeepSpeed's PipeModelDataParallelTopology (whose "data"
axis is DP x CP: pretrain.model.build_pipeline) agree rank for rank.

Context parallelism (--cp) splits each sample's sequence across CP ranks. As in Megatron, the CP ranks of one data-
parallel replica read the same samples (the data loader sees DP only), while gradient reduction and ZeRO
partitioning span DP x CP: DeepSpeed is handed the DP x CP group as its data-parallel group (MegatronMpu) and each
CP rank's loss is scaled by CP (pretrain.context_parallel).
"""
from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.compat import apply_cpu_compat
from pretrain.config import ModelConfig

RECOMPUTE_MODES = ("none", "selective", "full")


class LayoutError(ValueError):
    """An impossible parallel layout, with what to change."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    global_batch_size: int
    cp: int = 1  # context parallel: each sample's sequence split across this many ranks
    ep: int = 1  # expert parallel: each group of this many data-parallel ranks splits the experts (pretrain/moe.py)

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)


def validate_layout(model: ModelConfig, world_size: int, tp: int = 1, pp: int = 1, zero_stage: int = 0,
                    micro_batch_size: int = 1, global_batch_size: int | None = None,
                    recompute: str = "none", compile_layers: bool = False,
                    sequence_parallel: bool = False, cp: int = 1, ep: int = 1) -> Layout:
    """Check a layout before anything is built; the trainer and the planner both call this."""
    if tp < 1 or pp < 1 or cp < 1:
        raise LayoutError(f"--tp ({tp}), --pp ({pp}) and --cp ({cp}) must be >= 1")
    if world_size % (tp * pp * cp):
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}; world size must equal "
            f"TP x PP x CP x DP, so pick TP, PP and CP whose product divides the number of GPUs")
    dp = world_size // (tp * pp * cp)
    if model.num_attention_heads % tp:
        raise LayoutError(f"num_attention_heads={model.num_attention_heads} is not divisible by --tp {tp}")
    if model.num_query_groups % tp:
        raise LayoutError(
            f"num_query_groups={model.num_query_groups} is not divisible by --tp {tp}: each TP rank must own "
            f"whole key/value groups; lower --tp or raise --num-query-groups")
    if model.ffn_hidden_size % tp:
        raise LayoutError(f"ffn_hidden_size={model.ffn_hidden_size} is not divisible by --tp {tp}")
    if model.padded_vocab_size % tp:
        raise LayoutError(f"padded vocabulary {model.padded_vocab_size} is not divisible by --tp {tp}; raise "
                          f"make_vocab_size_divisible_by")
    if model.num_layers % pp:
        raise LayoutError(f"num_layers={model.num_layers} is not divisible by --pp {pp}")
    if cp > 1:
        _check_context_parallel(model, tp, cp, sequence_parallel, compile_layers)
    if pp > 1 and zero_stage > 1:
        raise LayoutError(
            f"pipeline parallelism (--pp {pp}) cannot run with ZeRO stage {zero_stage}: DeepSpeed's pipeline "
            f"engine partitions gradients per micro-batch itself and refuses ZeRO-2/3. Use ds_configs/"
            f"zero1_pp.json (ZeRO-1) with --pp, or --pp 1 with ZeRO-3")
    if zero_stage not in (0, 1, 2, 3):
        raise LayoutError(f"ZeRO stage must be 0-3, got {zero_stage}")
    if compile_layers and zero_stage == 3:
        raise LayoutError("--compile is supported with ZeRO 0-2: DeepSpeed's ZeRO-3 parameter hooks break "
                          "torch.compile'd layers; drop --compile or use ds_configs/zero2.json")
    if sequence_parallel and tp == 1:
        raise LayoutError("--sequence-parallel splits the sequence across tensor-parallel ranks: it needs --tp > 1 "
                          "(drop it, or raise --tp)")
    if model.is_moe or ep > 1:
        _check_experts(model, tp, dp, cp, ep, zero_stage, sequence_parallel, compile_layers)
    if recompute not in RECOMPUTE_MODES:
        raise LayoutError(f"--recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    if micro_batch_size < 1:
        raise LayoutError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    if global_batch_size is None:
        global_batch_size = micro_batch_size * dp
    if global_batch_size % (micro_batch_size * dp):
        raise LayoutError(
            f"--global-batch-size {global_batch_size} is not divisible by micro-batch-size x data-parallel "
            f"size = {micro_batch_size} x {dp}; choose a multiple of {micro_batch_size * dp}")
    return Layout(world_size, tp, pp, dp, zero_stage, micro_batch_size, global_batch_size, cp, ep)


def _check_experts(model: ModelConfig, tp: int, dp: int, cp: int, ep: int, zero_stage: int, sequence_parallel: bool,
                   compile_layers: bool) -> None:
    """What a mixture of experts and expert parallelism need (pretrain/moe.py says why)."""
    if ep < 1:
        raise LayoutError(f"--ep must be >= 1, got {ep}")
    if ep > 1 and not model.is_moe:
        raise LayoutError(f"--ep {ep} splits the experts of a mixture of experts, and this model has none; set "
                          f"--num-experts or drop --ep")
    if model.num_experts % ep:
        raise LayoutError(f"--num-experts {model.num_experts} does not split into --ep {ep} equal parts")
    if (dp * cp) % ep:
        raise LayoutError(f"--ep {ep} must divide the data-parallel size {dp}" + (f" x --cp {cp}" if cp > 1 else "")
                          + ": expert parallelism subdivides the ranks that hold the same model part "
                            "(expert-data-parallel = DP x CP / EP), as in Megatron")
    if ep > 1 and zero_stage == 0:
        raise LayoutError(f"--ep {ep} with ZeRO-0: DeepSpeed 0.19.8 clips ZeRO-0 gradients by the mean of the "
                          f"ranks' norms (runtime/utils.clip_grad_norm_), which is not the model's norm when ranks "
                          f"hold different experts; use ds_configs/zero1.json or zero2.json with --ep")
    if ep > 1 and zero_stage == 3:
        raise LayoutError(f"--ep {ep} with ZeRO-3: DeepSpeed 0.19.8 partitions no expert parameters under ZeRO-3 "
                          f"(\"MoE not supported with Stage 3\"); use ds_configs/zero1.json or zero2.json with "
                          f"--ep, or --ep 1 with ZeRO-3")
    if tp > 1 and not sequence_parallel:
        raise LayoutError(f"a mixture of experts with --tp {tp} needs --sequence-parallel: megatron-core's MoELayer "
                          f"refuses to train under TP without it (each TP rank would route and send every token)")
    if compile_layers and model.is_moe:
        raise LayoutError("--compile with a mixture of experts is untested (the token all-to-alls, the dispatcher's "
                          "host copies and the routing statistics' hooks sit inside the compiled layer); drop one")


def _check_context_parallel(model: ModelConfig, tp: int, cp: int, sequence_parallel: bool,
                            compile_layers: bool) -> None:
    """What context parallelism's all-to-all attention (pretrain/context_parallel.py) needs of the shapes."""
    if model.hidden_dropout or model.attention_dropout:
        raise LayoutError(
            f"--cp {cp} with dropout (hidden {model.hidden_dropout}, attention {model.attention_dropout}): the CP "
            f"ranks of a replica share one random stream, so their chunks and head groups would draw the same "
            f"masks; set --hidden-dropout 0 --attention-dropout 0 (the presets' default) or drop --cp")
    if compile_layers:
        raise LayoutError(f"--cp {cp} with --compile is untested (the attention's all-to-alls sit inside the "
                          f"compiled layer); drop one of them")
    heads = model.num_attention_heads // max(tp, 1)
    if heads % cp:
        raise LayoutError(
            f"--cp {cp}: attention exchanges whole heads across the CP ranks (all-to-all), and a TP rank's "
            f"{heads} attention heads (num_attention_heads={model.num_attention_heads} / --tp {tp}) do not divide "
            f"into {cp}; choose --cp dividing {heads}")
    per_rank = model.seq_length // cp
    if model.seq_length % cp or (sequence_parallel and per_rank % tp):
        raise LayoutError(
            f"--cp {cp}: the sequence length {model.seq_length} must split into {cp} equal chunks"
            + (f" each divisible by --tp {tp} (--sequence-parallel splits them further)" if sequence_parallel
               else "") + "; change --seq-length or --cp")


def init_distributed(tp: int, pp: int, seed: int = 1234, timeout_minutes: float = 10, cp: int = 1,
                     ep: int = 1) -> None:
    """Start torch.distributed through DeepSpeed (env://, Slurm or MPI) and build megatron-core's groups.

    Every process group gets the bounded timeout, so that a dead or stuck peer makes the others fail instead of
    hanging: the default group through init, megatron's groups (which ZeRO-3 reduces over) as an argument (they
    otherwise keep megatron's 30 minutes, docs/FINDINGS.md), and groups created without one (DeepSpeed's
    pipeline grid) through torch's module default, set here."""
    import deepspeed
    from datetime import timedelta
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    apply_cpu_compat()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(minutes=timeout_minutes)
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(timeout=timeout, auto_mpi_discovery="OMPI_COMM_WORLD_SIZE" in os.environ
                                   or "PMI_SIZE" in os.environ)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 context_parallel_size=cp, expert_model_parallel_size=ep,
                                                 distributed_timeout_minutes=timeout_minutes)
    # Same default stream on every rank (data order, sampling); megatron's tracker adds a per-TP-rank stream
    # for dropout inside tensor-parallel regions.
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # Python's and numpy's global generators too, as Megatron's _set_random_seed does: nothing of ours draws from
    # them, but a library might, and checkpoints hold their states (two runs of one command save the same bytes)
    random.seed(seed)
    np.random.seed(seed)


def shutdown_distributed() -> None:
    """Destroy megatron's groups and torch's default group at an orderly end (every rank got here).

    A gloo process that exits with its groups alive can abort in interpreter finalization: gloo's worker threads
    still hold work objects whose tensors need the GIL ("terminate called without an active exception", exit -6;
    pytorch/pytorch#190489, the reason given in #179291). It hit a 2-rank tp2 worker once in ~340 clean-clone
    runs (CI, 2026-12-03). Only on orderly ends, as torchtitan does (pytorch/torchtitan#1342): after a rank
    failed, the others may still be inside a collective."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier(group=None) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)


_HEARTBEAT, _FAILED = "dsllm/heartbeat/", "dsllm/failed/"


def heartbeat(step: int) -> None:
    """Tell the job's store (the rendezvous key-value store on the master) that this rank finished `step`:
    when a collective times out, `peers_report` names the ranks that fell behind."""
    if torch.distributed.is_initialized():
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set(f"{_HEARTBEAT}{rank()}", f"{step} {time.time():.0f} {socket.gethostname()}")


def peers_report(step: int, wait_s: float = 15.0) -> str:
    """After a collective failed or timed out on this rank: which ranks did not answer. Every live rank that
    fails reports itself to the job's store; the ranks that have not reported after `wait_s` seconds are the
    stuck or dead ones, named with their host and the last step they finished. Best effort: the store lives on
    the master, which may itself be the one gone."""
    from datetime import timedelta

    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=10))
        store.set(f"{_FAILED}{rank()}", str(step))
        deadline = time.time() + wait_s
        while True:
            silent = [r for r in range(world_size()) if not store.check([f"{_FAILED}{r}"])]
            if not silent or time.time() > deadline:
                break
            time.sleep(0.5)
        lines = []
        for r in silent:
            last = store.get(f"{_HEARTBEAT}{r}").decode().split(" ", 2) if store.check([f"{_HEARTBEAT}{r}"]) else None
            lines.append(f"rank {r} on {last[2]} (last finished step {last[0]} at "
                         f"{time.strftime('%H:%M:%S', time.localtime(float(last[1])))})" if last else f"rank {r}")
    except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the error it explains
        return f"the other ranks could not be asked ({e}); the master (rank 0) may be the one gone"
    if not silent:
        return "every rank hit the failure; none is stuck"
    return "not answering (stuck, dead or much slower): " + "; ".join(lines)


_PEER_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe",
                  "nccl communicator was aborted", "watchdog caught collective operation")


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank is gone or stuck (gloo and NCCL word it differently)."""
    return isinstance(e, RuntimeError) and any(p in str(e).lower() for p in _PEER_FAILURES)


def log(msg: str) -> None:
    """Print once per job (from global rank 0)."""
    if is_rank0():
        print(msg, flush=True)


class MegatronMpu:
    """megatron-core's parallel_state as DeepSpeed's `mpu`.

    DeepSpeed's ZeRO optimizers and checkpoint naming call get_model_parallel_rank/world_size, which
    megatron-core's parallel_state no longer has; everything else is delegated unchanged.
    """

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    def __getattr__(self, name):
        return getattr(self._ps, name)

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    # ZeRO partitioning and gradient averaging span data x context parallel (module docstring)
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()
