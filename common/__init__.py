"""Project-neutral helpers used by data_prep, pretrain and bench (no torch, no project imports)."""
