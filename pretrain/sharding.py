"""How each parameter is split across tensor-parallel ranks, by canonical name.

Canonical names are the PP=1 model's: "0.word_embeddings.weight", "3.layer.mlp.linear_fc1.weight",
"<L+1>.norm.weight", "<L+2>.output_layer.weight". The split of each comes from its family's table
(pretrain/param_table.py), which initialisation, checkpoints and Hugging Face import and export read too.
"""
from __future__ import annotations

import math

import torch

from pretrain import param_table


def canonical_name(name: str) -> str:
    """Strip DeepSpeed's wrappers ("module.") and map PipelineModule's tied embedding to stage 0."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name.replace("tied_modules.embed.", "0.")


def named_parameters(module: torch.nn.Module):
    """(canonical name, parameter) of every parameter of `module` (a model, a pipeline stage or DeepSpeed's engine
    module). Experts are named by their global index: under expert parallelism a rank's megatron MoELayer builds
    experts local_experts.0.. whose global indices start at its `local_expert_indices[0]` (pretrain/moe.py), and
    the name that initialisation seeds from and checkpoints and exports key by must be the same under any --ep."""
    offsets = {f"{prefix}.experts.local_experts.": m.local_expert_indices[0]
               for prefix, m in module.named_modules() if hasattr(m, "local_expert_indices")}
    for raw, param in module.named_parameters():
        name = raw
        for prefix, offset in offsets.items():
            if offset and raw.startswith(prefix):
                local, rest = raw[len(prefix):].split(".", 1)
                name = f"{prefix}{int(local) + offset}.{rest}"
        yield canonical_name(name), param


def split_rule(name: str):
    """(the dimension split over TP ranks or None, gated) of a parameter, from its family's table
    (pretrain/param_table.py; a name in no table is a KeyError naming the fix). Gated: the tensor is [gate; up]
    and each half is split on its own."""
    p = param_table.lookup(name)
    return p.tp_dim, p.gated


def full_shape(name: str, local_shape: tuple, tp: int) -> tuple:
    dim, _ = split_rule(name)
    if dim is None:
        return local_shape
    shape = list(local_shape)
    shape[dim] *= tp
    return tuple(shape)


def local_shape(name: str, full: tuple, tp: int) -> tuple:
    """The shape one tensor-parallel rank holds of a parameter of full shape `full`."""
    dim, _ = split_rule(name)
    if dim is None:
        return tuple(full)
    if full[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of {tuple(full)} does not split into {tp} tensor-parallel parts")
    shape = list(full)
    shape[dim] //= tp
    return tuple(shape)


def shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    dim, gated = split_rule(name)
    if dim is None or tp == 1:
        return full
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard`: TP slices (rank order) -> the full tensor."""
    dim, gated = split_rule(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated:
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def stage_parameters(cfg, tp: int, pp: int, stage: int, ep: int = 1) -> list[tuple[str, int]]:
    """(canonical name, elements one TP rank holds) of one pipeline stage's parameters, in the PP=1 model's order.

    pretrain/model.build_pipeline cuts on blocks ("type:Block", layers divisible by PP, pretrain/parallel.py): the
    embedding joins the first stage, the final norm and output layer the last. With tied embeddings under PP the
    last stage holds its own copy of the embedding (DeepSpeed's TiedLayerSpec), whose gradient is all-reduced
    with the first stage's every step. The planner's memory (pretrain/plan.py) and traffic (pretrain/steptime.py)
    both count from here. A mixture of experts under --ep holds num_experts / ep of each layer's experts (those of
    EP rank 0 are listed; every EP rank holds as many)."""
    layers = cfg.num_layers // pp
    first, last = stage * layers + 1, (stage + 1) * layers
    held = {name for name, e in param_table.entries(cfg).items()
            if e.expert is None or e.expert < cfg.num_experts // ep}
    local = {name: math.prod(local_shape(name, shape, tp)) for name, shape in cfg.parameter_shapes().items()
             if name in held}
    out = []
    for name, n in local.items():
        index = int(name.split(".")[0])
        if (index == 0 and stage == 0) or first <= index <= last or (index > cfg.num_layers and stage == pp - 1):
            out.append((name, n))
    if cfg.tie_embeddings and pp > 1 and stage == pp - 1:
        out.append(("0.word_embeddings.weight", local["0.word_embeddings.weight"]))
    return out
