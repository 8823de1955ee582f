"""Measure what autograd keeps per layer on this device and fit the planner's activation model to it.

Runs our Block / head at small shapes that vary every dimension, counts the bytes saved for backward
(pretrain.memory.SavedActivations) and fits per-token and per-position coefficients for each recompute mode.
Prints them next to the coefficients pretrain.plan uses for this device type, so a kernel change (a fused
RMSNorm, a different attention backend) that moves them shows up.

  python bench/activation_memory.py [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import emit, single_rank_env  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="append the fitted coefficients as one JSON line to this file")
    a = p.parse_args(argv)
    single_rank_env(29612)
    import torch

    from pretrain.memory import fit_activation_model
    from pretrain.parallel import init_distributed
    from pretrain.plan import ACTIVATION_COEFFICIENTS

    init_distributed(1, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fitted = fit_activation_model()
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "fitted": fitted}
    stored = ACTIVATION_COEFFICIENTS[device]
    result["max_abs_diff_vs_planner"] = max(abs(fitted[m][k] - stored[m].get(k, 0.0))
                                            for m in fitted for k in fitted[m])
    return emit(result, a.json, indent=1)


if __name__ == "__main__":
    sys.exit(main())
