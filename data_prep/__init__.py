"""data_prep: raw corpora -> cleaned, deduplicated, tokenized Megatron indexed shards with a manifest."""
