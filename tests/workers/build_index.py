"""Two ranks build the dataset index cache; each reports whether it built and what the cache holds."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import torch.distributed as dist  # noqa: E402

from pretrain.data import DataConfig, _cache_is_shared, _is_builder, build_datasets  # noqa: E402

data, cache, out = sys.argv[1], sys.argv[2], sys.argv[3]
if os.environ.get("SIMULATE_NODES"):  # one rank per "node": each is its node's local rank 0
    os.environ["LOCAL_RANK"] = "0"
dist.init_process_group("gloo")
rank = dist.get_rank()
cache = cache.replace("RANK", str(rank))
os.makedirs(cache, exist_ok=True)
shared = _cache_is_shared(cache)
train, valid, test = build_datasets(DataConfig(data_path=[data], split="90,5,5", seq_length=32, seed=3,
                                               cache_dir=cache, vocab_size=400, eod_id=0), (500, 50, 50))
first = train[0]["tokens"].tolist()
with open(f"{out}.{rank}.json", "w") as f:
    json.dump({"shared": shared, "builder": _is_builder(shared), "cache_files": sorted(os.listdir(cache)),
               "first": first, "n": len(train)}, f)
# Both ranks reach here before either tears gloo down: a rank destroying its group while the other still
# holds the connection aborted the other ("terminate called without an active exception"), 1 run in ~5.
dist.barrier()
dist.destroy_process_group()
