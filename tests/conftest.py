import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORKERS = ROOT / "tests" / "workers"


def launch(nproc: int, script, *args, timeout: int = 300, env: dict | None = None, check: bool = True):
    """Run a script on `nproc` local CPU ranks with torchrun (gloo), returning the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    # Own process group: on a timeout every rank dies with the launcher (killing only torchrun leaves its ranks
    # spinning, which starves every later test on a 2-core machine).
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                             start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout}s:\n{out[-3000:]}\n{err[-6000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def train_layout(tmp_path_factory):
    """train_layout(nproc, **flags) -> {"losses": [...], "grad_norms": [...], ...}, cached per layout."""
    cache = {}
    out_dir = tmp_path_factory.mktemp("layouts")

    def run(nproc: int, **flags):
        key = (nproc, tuple(sorted(flags.items())))
        if key not in cache:
            out = out_dir / f"run{len(cache)}.json"
            args = []
            for k, v in sorted(flags.items()):
                flag = "--" + k.replace("_", "-")
                if v is True:
                    args.append(flag)
                elif v is not False:
                    args += [flag, v]
            launch(nproc, WORKERS / "train_layout.py", *args, "--out", out)
            cache[key] = json.loads(out.read_text())
        return cache[key]

    return run


WORDS = ("the of and to in is for that with on as by this are from at be or an was model data train token "
         "layer parallel shard rank node batch sequence memory kernel python corpus filter").split()


def make_doc(rng, n_words: int = 60) -> str:
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(6, 14))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return "\n".join(lines)


def prepare_corpus(out_dir, tokenizer_dir, n_docs: int, seed: int, words=None, shard_tokens=20000):
    import random

    from data_prep.pipeline import PrepareOptions, prepare

    rng = random.Random(seed)
    raw = Path(out_dir) / "raw.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with open(raw, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"doc {seed}-{i}. " + make_doc(rng, rng.randint(30, 120))}) + "\n")
    prepare(PrepareOptions(inputs=[str(raw)], tokenizer=str(tokenizer_dir), output=str(out_dir),
                           shard_tokens=shard_tokens, chunk_docs=64, progress=False))
    raw.unlink()
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    import random

    from data_prep.tokenizer import train_bpe

    rng = random.Random(0)
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe((make_doc(rng) for _ in range(300)), vocab_size=400, output_dir=str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_tokenizer):
    """A data_prep output directory (about 100k tokens, several shards) for training tests."""
    return prepare_corpus(tmp_path_factory.mktemp("data"), tiny_tokenizer, n_docs=1200, seed=11)


@pytest.fixture(scope="session")
def meta_model_builder():
    """Build models with megatron-core's layers allocating on the meta device (no memory, even for 70B)."""
    from pretrain.compat import apply_cpu_compat

    apply_cpu_compat()
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    from pretrain.model import GPT

    def build(cfg, device="meta"):
        if device != "meta":  # real CPU tensors (tiny configs only)
            return GPT(cfg)
        original = torch.cuda.current_device
        torch.cuda.current_device = lambda: "meta"
        try:
            with torch.device("meta"):
                return GPT(cfg)
        finally:
            torch.cuda.current_device = original

    return build
