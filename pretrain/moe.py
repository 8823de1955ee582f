"""Mixture of experts: megatron-core's MoELayer in each transformer layer, expert parallelism (--ep), and the glue
DeepSpeed needs to reduce expert gradients over the right ranks.

The layer (pretrain.model.layer_spec): megatron-core's TopKRouter (softmax over the top-k logits, Mixtral's
routing; with top-1 the softmax over all experts, Switch Transformer's; the Switch/GShard load-balancing loss
"aux_loss" and the optional ST-MoE z-loss), the "alltoall" token dispatcher, SequentialMLP experts (one SwiGLU
MLP per expert, run one after another: megatron's grouped GEMM needs the grouped_gemm package or Transformer
Engine, neither of which runs on the CPU) and an optional shared expert. Dropless: no capacity factor, every token
reaches its k experts, so no token is ever dropped (megatron's default; the run log says so).

Expert parallelism as in Megatron: the data-parallel ranks of one TP rank are cut into groups of --ep, each rank
of a group holding num_experts / ep experts; the all-to-all sends each token to its experts' ranks and back.
Expert weights are data parallel only over the DP / EP ranks that hold the same experts (megatron's
expert-data-parallel group). Megatron marks them `allreduce = False` (when EP > 1), which is also how DeepSpeed
recognises its own MoE parameters (deepspeed.moe.utils.is_moe_param); DeepSpeed then reduces them over its
expert-data-parallel group named "ep_size_<ep>" and keeps them in optimizer groups of their own. DeepSpeed only
turns that machinery on when the model holds one of its own MoE layers (engine.has_moe_layers, DeepSpeed 0.19.8),
so `ExpertGroups` below is a parameterless stand-in that says "this model has experts" and hands DeepSpeed
megatron's expert groups (one source of truth for which ranks hold which experts, with our timeout).

What works (DeepSpeed 0.19.8, megatron-core 0.16.1; each equal to one process in tests/pretrain/test_moe.py):
EP 1 under ZeRO 0-3 (the experts are then ordinary parameters); EP > 1 under ZeRO 1 and 2, with TP (megatron
requires sequence parallelism for MoE under TP; the router's gradient is then summed over TP here), PP, CP,
recompute, the document mask, and the mlm and sft objectives. Refused by validate_layout, naming what to use:
EP > 1 with ZeRO-3 (DeepSpeed: "MoE not supported with Stage 3"; its ZeRO-3 partitions only its own AutoEP layers)
and with ZeRO-0 (DeepSpeed clips ZeRO-0 gradients by the mean of the ranks' norms, not the norm, when ranks hold
different experts).
"""
from __future__ import annotations

import torch

from pretrain.config import ModelConfig


def moe_config(cfg: ModelConfig) -> dict:
    """megatron-core TransformerConfig fields of this model's MoE layers (none for a dense model)."""
    if not cfg.is_moe:
        return {}
    from megatron.core import parallel_state

    _router_without_transformer_engine()

    ep = parallel_state.get_expert_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() \
        else 1
    return dict(
        num_moe_experts=cfg.num_experts, moe_router_topk=cfg.moe_top_k, moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        expert_model_parallel_size=ep, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, moe_z_loss_coeff=cfg.moe_z_loss_coeff or None,
        # the router's softmax and top-k in fp32 whatever the parameters' dtype (Megatron's recommendation for bf16
        # training: routing decisions flip on bf16 rounding)
        moe_router_dtype="fp32",
        # top-1: the softmax over all experts, the chosen one's probability its weight (Switch Transformer): megatron
        # refuses a softmax over the one chosen logit (always 1: no gradient to the router)
        moe_router_pre_softmax=cfg.moe_top_k == 1,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_size or None,
    )


def _router_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router matmul (moe_utils.RouterGatingLinearFunction) tests `te_general_gemm is not
    None`, a name its module defines only when Transformer Engine imports: without TE every router forward is a
    NameError. Define it as None, which selects the plain torch matmul the function falls back to."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert (data-)parallel groups of this EP size (deepspeed.moe.layer.MoE's)."""
    return f"ep_size_{ep}"


def _expert_groups_class():
    """ExpertGroups: a subclass of DeepSpeed's MoE (which engine.has_moe_layers looks for) built without running
    its constructor: no parameters, no forward. DeepSpeed calls set_deepspeed_parallelism on it before building
    the optimizer; it registers megatron's expert groups under DeepSpeed's group name. (A factory: deepspeed is
    imported only when a model with experts is built.)"""
    from deepspeed.moe.layer import MoE

    class ExpertGroups(MoE):
        def __init__(self, num_experts: int, ep: int):
            torch.nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep
            self.num_local_experts = num_experts // ep
            self.expert_group_name = expert_group_name(ep)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            register_deepspeed_groups(self.ep_size)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertGroups only tells DeepSpeed that the model has experts; it computes nothing")

    return ExpertGroups


def register_deepspeed_groups(ep: int) -> None:
    """Give DeepSpeed megatron's expert-parallel and expert-data-parallel groups under its name for them. Written
    into deepspeed.utils.groups' dictionaries, where DeepSpeed's own MoE layer would create its groups
    (groups._create_expert_and_data_parallel, DeepSpeed 0.19.8): megatron's are the ones the token dispatcher
    sends over, built with our timeout, so there is one answer to which ranks hold which experts."""
    import torch.distributed as dist
    from deepspeed.utils import groups
    from megatron.core import parallel_state

    name = expert_group_name(ep)
    expert = parallel_state.get_expert_model_parallel_group()
    expert_data = parallel_state.get_expert_data_parallel_group()
    groups._EXPERT_PARALLEL_GROUP[name] = expert
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_data
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert_data)
    # Experts are split over TP (megatron's expert tensor parallelism = TP): DeepSpeed's BF16_Optimizer (bf16 with
    # fp32 gradient accumulation: PP, or a config asking for it) sums expert gradient norms over the model-parallel
    # group only when this says so (runtime/utils.get_global_norm_of_tensors); left at 1, each TP rank clipped by
    # its own shards' norm (measured: TP 2 x EP 2 reported 0.60365 against one process's 0.60555)
    groups.expert_tensor_parallel_world_size = parallel_state.get_expert_tensor_parallel_world_size()


def reduce_router_grads_over_tp(model: torch.nn.Module) -> None:
    """Under sequence parallelism each TP rank routes its own part of the sequence, so a router weight's gradient
    on one TP rank is a partial sum: add the TP ranks' (megatron marks the weight `sequence_parallel` and its
    finalize_model_grads all-reduces such gradients over TP; DeepSpeed knows nothing of the mark). A hook on the
    weight's gradient, before it is accumulated, as our RMSNorm's copy_to_tensor_model_parallel_region does for
    the norms (pretrain/model.py)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.router import TopKRouter

    group = parallel_state.get_tensor_model_parallel_group()
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return

    def all_reduce(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
        if router.config.sequence_parallel:
            router.weight.register_hook(all_reduce)


def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DeepSpeed treats as its MoE parameters (megatron's `allreduce = False` expert weights)."""
    from deepspeed.moe.utils import is_moe_param

    return [p for p in model.parameters() if is_moe_param(p)]


def prepare_for_deepspeed(model: torch.nn.Module, cfg: ModelConfig, ep: int) -> None:
    """Before deepspeed.initialize: router gradients summed over TP under sequence parallelism; under EP > 1 each
    expert parameter's group named and the ExpertGroups stand-in added, so that DeepSpeed reduces expert gradients
    over the expert-data-parallel ranks only."""
    reduce_router_grads_over_tp(model)
    experts = expert_parameters(model)
    if ep == 1 or not cfg.is_moe:
        assert not experts, "megatron marks experts allreduce=False only under expert parallelism"
        return
    for p in experts:
        p.group_name = expert_group_name(ep)
    # inside the first MoE layer, which runs its own children by name: GPT runs its children in order
    first = next(m for m in model.modules() if hasattr(m, "local_expert_indices"))
    first.add_module("deepspeed_expert_groups", _expert_groups_class()(cfg.num_experts, ep))


def split_optimizer_groups(groups: list[dict]) -> list[dict]:
    """DeepSpeed's split of optimizer groups into dense and expert ones (each expert group named by its
    expert-parallel group): ZeRO-1/2 partition each expert group over its expert-data-parallel ranks."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]  # it keys groups by name
    return split_params_into_different_moe_groups_for_optimizer(named)


def set_aux_loss_scale(grad_accum_steps: int, cp: int = 1) -> None:
    """megatron's routers inject the load-balancing (and z-) loss gradient straight into backward
    (MoEAuxLossAutoScaler) with a scale of 1 unless told: DeepSpeed divides the language-model loss by the
    gradient accumulation steps before its backward, so the auxiliary gradient must be divided the same way, or
    its weight would grow with the number of micro-batches (megatron's own schedules set num_microbatches here).
    Under context parallelism each CP rank's auxiliary losses are its share of the sequence's (megatron reduces
    the expert counts over TP x CP and divides the z-loss by it), and DeepSpeed averages gradients over DP x CP:
    times CP, as the language-model loss is (pretrain/context_parallel.py)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from pretrain.compat import device

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(cp / grad_accum_steps, device=device()))


class RoutingStats:
    """What each step's routing did, for the log (metrics.jsonl: moe_aux_loss, moe_z_loss, moe_imbalance): the
    load-balancing loss (without its coefficient, as Megatron logs it) and z-loss that megatron's routers tracked,
    each the mean over layers and micro-batches, averaged over data-parallel ranks; and the expert imbalance, the
    busiest expert's tokens over the mean per expert (1.0 = even), the mean over layers of the whole step's counts
    summed over all ranks. Counts come from a forward hook on every router (a recompute counts a layer twice, which
    no ratio sees). Layers are indexed by their number, so that pipeline stages, each holding some, add up. And the
    dropped token copies (moe_dropped): those routed less those the experts computed (each expert's rows, counted
    by a hook on the experts, once per TP rank, which all compute every token sent to their experts), 0 for the
    dropless layers here (module docstring): a count, not a constant."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        from megatron.core.transformer.moe.experts import SequentialMLP
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers, self.counts, self.computed = num_layers, None, 0
        for m in model.modules():
            if isinstance(m, TopKRouter):
                m.register_forward_hook(self._count)
            elif isinstance(m, SequentialMLP):
                m.register_forward_pre_hook(self._computed)

    def _computed(self, experts, inputs):
        if experts.training:
            self.computed += inputs[0].size(0)  # the permuted token copies this rank's experts compute

    def _count(self, router, inputs, output):
        if not router.training:
            return
        routed = output[1].detach().sum(dim=0, dtype=torch.float64)  # routing_map [tokens, experts]
        if self.counts is None:
            self.counts = torch.zeros(self.num_layers, routed.numel(), dtype=torch.float64, device=routed.device)
        self.counts[router.layer_number - 1] += routed

    def step_metrics(self, grad_accum_steps: int) -> dict:
        """The step's figures (collective: every rank calls it), then reset."""
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, \
            get_moe_layer_wise_logging_tracker

        from pretrain.compat import device

        tracker = get_moe_layer_wise_logging_tracker()
        out = {}
        for name in ("load_balancing_loss", "z_loss"):
            if name not in tracker:
                continue
            value = tracker[name]["values"].to(device(), torch.float64).sum().reshape(1)  # this stage's layers
            if dist.is_initialized():
                dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())  # every layer's
                if tracker[name].get("reduce_group") is not None:  # the load-balancing loss under sequence
                    dist.all_reduce(value, group=tracker[name]["reduce_group"])  # parallelism: a TP rank's share
                else:  # the z-loss: a TP rank's mean over its tokens (megatron logs one rank's); the TP ranks' mean
                    tp = parallel_state.get_tensor_model_parallel_group()
                    dist.all_reduce(value, group=tp)
                    value /= dist.get_world_size(tp)
                group = parallel_state.get_data_parallel_group(with_context_parallel=True)
                dist.all_reduce(value, group=group)
                value /= dist.get_world_size(group)
            out[{"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}[name]] = \
                value.item() / (self.num_layers * grad_accum_steps)
        clear_aux_losses_tracker()
        counts = self.counts if self.counts is not None else torch.zeros(self.num_layers, 1, dtype=torch.float64,
                                                                          device=device())
        computed = torch.tensor([float(self.computed)], dtype=torch.float64, device=counts.device)
        if dist.is_initialized():  # every rank routes its own tokens (TP ranks under sequence parallelism too; a
            dist.all_reduce(counts)  # pipeline stage its own layers); TP ranks without SP repeat one another
            dist.all_reduce(computed)
            computed /= parallel_state.get_tensor_model_parallel_world_size()
        self.counts, self.computed = None, 0
        if counts.sum() > 0:
            out["moe_imbalance"] = (counts.max(dim=1).values / counts.mean(dim=1)).mean().item()
            out["moe_dropped"] = (counts.sum() - computed).item()
        return out
