import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORKERS = ROOT / "tests" / "workers"


def launch(nproc: int, script, *args, timeout: int = 300, env: dict | None = None, check: bool = True):
    """Run a script on `nproc` local CPU ranks (gloo), returning the completed process: ranks forked from the
    session's pre-imported server (tests/zygote.py: torchrun's environment, ~1.5 s a launch instead of ~7-8 s),
    or with torchrun itself when TESTS_LAUNCHER=torchrun."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if os.environ.get("TESTS_LAUNCHER") == "torchrun":
        return _torchrun(nproc, script, args, timeout, full_env, check)
    import zygote

    cmd = ["zygote", f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    code, out, err, timed_out = zygote.run(nproc, str(script), [str(a) for a in args], full_env, str(ROOT),
                                           free_port(), timeout)
    if timed_out:
        _timed_out(cmd, timeout, out, err)
    return _finished(cmd, code, out, err, check)


def _timed_out(cmd: list, timeout: int, out: str, err: str):
    raise AssertionError(f"{' '.join(cmd)} timed out after {timeout}s:\n{out[-3000:]}\n{err[-6000:]}")


def _finished(cmd: list, code: int, out: str, err: str, check: bool) -> subprocess.CompletedProcess:
    if check and code != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({code}):\n{out[-4000:]}\n{err[-8000:]}")
    return subprocess.CompletedProcess(cmd, code, out, err)


def _torchrun(nproc: int, script, args, timeout: int, full_env: dict, check: bool):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    # Own process group: on a timeout every rank dies with the launcher (killing only torchrun leaves its ranks
    # spinning, which starves every later test on a 2-core machine).
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                             start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        _timed_out(cmd, timeout, out, err)
    return _finished(cmd, popen.returncode, out, err, check)


LAYOUT_DEFAULTS = {"zero": 0, "micro_batch_size": 2, "global_batch_size": 4}
LAYOUT_STEPS, LAYOUT_SAVE_AT = 8, 3


@pytest.fixture
def hide_package(monkeypatch):
    """hide_package(name): importlib finds no such module for the rest of the test (a flag's optional package
    missing, without uninstalling it)."""
    import importlib.util

    real = importlib.util.find_spec

    def hide(name: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))

    return hide


@pytest.fixture(scope="session")
def train_layout(tmp_path_factory):
    """train_layout(nproc, **flags) -> the worker's report (losses and grad norms in step order, ...) plus "dir":
    one run of tests/workers/train_layout.py per layout, shared by every test that asks for it. Each trains
    LAYOUT_STEPS steps, saves a checkpoint (dir/ck) and the logits of a held-out micro-batch
    (dir/logits-3.pt) after step LAYOUT_SAVE_AT, and counts each step's torch.distributed calls (on the
    loss-owning rank) and their bytes by kind (on every rank: report["ranks"])."""
    cache = {}
    root = tmp_path_factory.mktemp("layouts")

    def run(nproc: int, **flags):
        flags = {k: v for k, v in flags.items()  # the worker's defaults, spelled out or not, are one run
                 if v is not False and v is not None and not (k in ("tp", "pp") and v == 1)}
        if "ds_config" in flags:
            flags = {k: v for k, v in flags.items() if k != "zero"}
        else:
            flags = {**LAYOUT_DEFAULTS, **flags}
        key = (nproc, tuple(sorted(flags.items())))
        if key not in cache:
            d = root / f"run{len(cache)}"
            d.mkdir(exist_ok=True)  # a layout that failed is tried again by the next test asking (same name)
            args = []
            for k, v in sorted(flags.items()):
                flag = "--" + k.replace("_", "-")
                if v is True:
                    args.append(flag)
                elif v is not False:
                    args += [flag, v]
            launch(nproc, WORKERS / "train_layout.py", *args, "--steps", LAYOUT_STEPS, "--save", d / "ck",
                   "--save-at", LAYOUT_SAVE_AT, "--dump-logits", d / "logits-{step}.pt", "--count-collectives",
                   "--out", d / "report.json")
            report = json.loads((d / "report.json").read_text())
            report["by_step"] = dict(report["losses"])
            report["ranks"] = [json.loads((d / f"report.json.rank{r}").read_text()) for r in range(nproc)]
            for k in ("losses", "grad_norms"):  # by step -> in step order
                report[k] = [report[k][s] for s in sorted(report[k], key=int)]
            cache[key] = {**report, "dir": d}
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
def chat_tokenizer(tmp_path_factory):
    """A tiny tokenizer with ChatML's special tokens and template (train-tokenizer --chat-template chatml)."""
    import random

    from data_prep.tokenizer import train_bpe

    rng = random.Random(0)
    out = tmp_path_factory.mktemp("chat-tokenizer")
    train_bpe((make_doc(rng) for _ in range(300)), vocab_size=400, output_dir=str(out), chat_template="chatml")
    return str(out)


def make_conversation(rng, turns: int = 1, answer_words: int = 20, prompt_words=(4, 12),
                      system: float = 0.3) -> list[dict]:
    """A conversation of `turns` user/assistant exchanges (answers of about answer_words words), with a system turn
    first at probability `system`."""
    messages = [{"role": "system", "content": make_doc(rng, 6)}] if rng.random() < system else []
    for _ in range(turns):
        messages += [{"role": "user", "content": make_doc(rng, rng.randint(*prompt_words))},
                     {"role": "assistant", "content": make_doc(rng, max(1, answer_words + rng.randint(-3, 3)))}]
    return messages


def prepare_conversations(out_dir, tokenizer_dir, conversations, **kw):
    """data_prep --format chat of `conversations` -> the output directory."""
    from data_prep.pipeline import PrepareOptions, prepare

    raw = Path(out_dir) / "raw.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with open(raw, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    prepare(PrepareOptions(inputs=[str(raw)], tokenizer=str(tokenizer_dir), output=str(out_dir), data_format="chat",
                           chunk_docs=64, progress=False, **kw))
    raw.unlink()
    return str(out_dir)


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory, chat_tokenizer):
    """Conversations of very different lengths (1-2 turns, answers of 1 to ~16 words; cut to 65 tokens, the tiny
    model's seq_length + 1), as data_prep --format chat writes them: a fine-tuning data directory."""
    import random

    rng = random.Random(21)
    convs = [make_conversation(rng, turns=rng.choice([1, 1, 1, 2]), answer_words=rng.choice([1, 2, 6, 16]),
                               prompt_words=(1, 5), system=0.1) for _ in range(240)]
    return prepare_conversations(tmp_path_factory.mktemp("sft-data"), chat_tokenizer, convs, max_tokens=65,
                                 too_long="truncate", shard_tokens=6000)


def read_conversations(out) -> list[tuple[list[int], list[int]]]:
    """Every (ids, loss mask) document of a conversation directory, the ids through megatron-core's reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    man = json.load(open(os.path.join(out, "manifest.json")))
    docs = []
    for shard in man["shards"]:
        ids, mask = (IndexedDataset(os.path.join(out, p)) for p in (shard["path"], shard["loss_mask"]["path"]))
        assert len(ids) == len(mask)
        docs += [(ids[i].tolist(), mask[i].tolist()) for i in range(len(ids))]
    return docs


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
    from pretrain.model import GPT, ModelOptions

    def build(cfg, device="meta", recompute="none", **options):
        if device != "meta":  # real CPU tensors (tiny configs only)
            return GPT(cfg, 1, ModelOptions(recompute=recompute, **options))
        original = torch.cuda.current_device
        torch.cuda.current_device = lambda: "meta"
        try:
            with torch.device("meta"):
                return GPT(cfg)
        finally:
            torch.cuda.current_device = original

    return build


# ------------------------------------------------------------------------------------------ data_prep helpers


def run_prepare(inputs, tokenizer, out, **kw):
    from data_prep.pipeline import PrepareOptions, prepare

    kw.setdefault("progress", False)
    return prepare(PrepareOptions(inputs=[str(i) for i in inputs], tokenizer=tokenizer, output=str(out), **kw))


def read_back(out) -> list[list[int]]:
    """Every document of every shard, through megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    man = json.load(open(os.path.join(out, "manifest.json")))
    docs = []
    for shard in man["shards"]:
        ds = IndexedDataset(os.path.join(out, shard["path"]))
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def expected_ids(tokenizer_dir, texts):
    from data_prep.clean import normalize
    from data_prep.tokenizer import eod_id, load

    tok = load(tokenizer_dir)
    eod = eod_id(tok, tokenizer_dir)
    return [tok.encode(normalize(t), add_special_tokens=False).ids + [eod] for t in texts]


def write_jsonl(path, texts, key="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": 1}) + "\n")


def assert_accounting(man):
    c = man["counts"]
    assert c["documents_read"] == c["documents_kept"] + sum(c["dropped"].values())


# ----------------------------------------------------------------------------------------------- readers
@pytest.fixture(scope="session")
def texts():
    rng = random.Random(1)
    return [make_doc(rng) for _ in range(12)]


# ----------------------------------------------------------------------------------------------- scale out
@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    d = tmp_path_factory.mktemp("corpus")
    docs = [make_doc(rng, rng.randint(20, 200)) for _ in range(1500)]
    docs += docs[:100]  # duplicates across files
    rng.shuffle(docs)
    for i in range(6):
        write_jsonl(d / f"part{i}.jsonl", docs[i::6])
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer):
    return tiny_tokenizer


# ------------------------------------------------------------------------------------------ a downstream task
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """A local lm-eval multiple-choice task (YAML and data file, no download): --eval-tasks tiny_mc."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(3)
    with open(d / "tiny_mc.jsonl", "w") as f:
        for _ in range(24):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + " is"
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(4)]
            f.write(json.dumps({"question": question, "choices": choices, "answer": rng.randrange(4)}) + "\n")
    (d / "tiny_mc.yaml").write_text(TASK.format(data=d / "tiny_mc.jsonl"))
    return d


# ------------------------------------------------------------------------------------------ trainer helpers
MAIN = ROOT / "pretrain" / "main.py"


def common(data, tmp_path, *extra):
    return ["--data-path", data, "--split", "80,10,10", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--seq-length", "32", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--lr", "2e-3",
            "--warmup-iters", "2", "--num-workers", "0", "--log-dir", str(tmp_path / "logs"), *map(str, extra)]


def metrics(tmp_path, name="logs") -> list[dict]:
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(rows) -> dict[int, float]:
    """step -> loss; a resumed run appends, and its later lines win."""
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None and "val_loss" not in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(n: int, args: list, env: dict | None = None) -> list[subprocess.Popen]:
    """One process per rank with RANK/WORLD_SIZE/MASTER_* set, exactly as srun starts them under Slurm."""
    port = free_port()
    procs = []
    for rank in range(n):
        e = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
             "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1", **(env or {})}
        procs.append(subprocess.Popen([sys.executable, str(MAIN), *map(str, args)], cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def full_disk_run(data, tmp_path, *extra):
    """A 2-rank ZeRO-3 run saving every 2 steps into a 600 KB tmpfs (its first save cannot fit) ->
    (exit codes, rank 0's output, the checkpoint directory's entries, its .tmp files). Needs root (mount)."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], check=True)
    try:
        procs = spawn_ranks(2, ["--deepspeed_config", "ds_configs/zero3.json", "--train-iters", "6", "--save",
                                disk / "ck", "--save-interval", "2", "--hidden-size", "128", "--ffn-hidden-size",
                                "256", *common(data, tmp_path), *map(str, extra)])
        codes = [p.wait(timeout=300) for p in procs]
        return codes, procs[0].stdout.read(), [p.name for p in (disk / "ck").iterdir()], list(disk.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def wait_for_step(tmp_path, step: int, procs, timeout=240):
    path = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(r.get("step", 0) >= step for r in map(json.loads, path.read_text().splitlines())):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited early:\n" + "\n".join(p.stdout.read()[-3000:] for p in procs))
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout}s")


_PEAK = ("import os, subprocess, sys\n"
         "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
         "_, status, usage = os.wait4(p.pid, 0)\n"
         "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def peak_rss_mib(cmd: list, cwd=ROOT) -> float:
    """Peak RSS of `cmd` (its largest process: itself or a worker it waited for). Started from a small launcher:
    a process forked straight from pytest would count pytest's own pages in its peak."""
    res = subprocess.run([sys.executable, "-c", _PEAK, *map(str, cmd)], cwd=cwd, capture_output=True, text=True)
    code, kib = res.stdout.split()
    assert int(code) == 0, f"{cmd} failed ({code})"
    return int(kib) / 1024
