"""pretrain: GPT/Llama pretraining on megatron-core layers under DeepSpeed.

Importing this package first (every entry point does) leaves megatron-core's fusions eager on CPU: see below."""
import sys as _sys
import types as _types


def _eager_megatron_fusions_on_cpu() -> None:
    """megatron/core/jit.py (megatron-core 0.16.1) makes `jit_fuser` torch.compile, and the package's __init__
    decorates its fusions with it at import, which imports torch._dynamo and _inductor: `import pretrain.model,
    deepspeed` took 5.1-6.3 s per rank with them and 3.2-3.3 s without (2026-12-03, docs/FINDINGS.md), in every rank
    of every launch. megatron's own disable_jit_fuser() cannot run before that __init__. Without a GPU the fusions
    gain nothing worth that, so there `jit_fuser` is the identity (the same functions, eager); with a GPU, and once
    megatron is imported, nothing changes."""
    if any(name in _sys.modules for name in ("megatron.core", "megatron.core.jit")):
        return
    import torch

    if torch.cuda.is_available():
        return
    jit = _types.ModuleType("megatron.core.jit", "pretrain/__init__.py: megatron's jit_fuser, eager on CPU")
    jit.jit_fuser = jit.noop_decorator = lambda func: func
    jit.enable_jit_fuser = jit.disable_jit_fuser = lambda: None
    _sys.modules["megatron.core.jit"] = jit


_eager_megatron_fusions_on_cpu()
