"""pretrain: GPT/Llama pretraining on megatron-core layers under DeepSpeed."""
