"""tests/zygote.py, the tests' launcher: its ranks see torchrun's environment and run the script as __main__, a
failing rank's exit code is the job's and stops the others (as torchrun's agent does), and the server really holds
the imports (the point of it)."""
import time

from conftest import launch

SCRIPT = """import os, sys, time
r = int(os.environ["RANK"])
print("rank", r, os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], __name__,
      "megatron.core" in sys.modules, sys.argv[1:])
if sys.argv[1] == "fail" and r == 1:
    sys.exit(3)
if sys.argv[1] == "fail":
    time.sleep(120)
"""


def test_ranks_get_torchruns_environment_and_a_failure_stops_the_job(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    out = launch(2, script, "ok", "x y").stdout
    assert "rank 0 0 2 127.0.0.1 __main__ True ['ok', 'x y']" in out and "rank 1 1 2 127.0.0.1" in out, out
    t0 = time.time()
    bad = launch(2, script, "fail", check=False)
    assert bad.returncode == 3 and time.time() - t0 < 30, (bad.returncode, time.time() - t0)
