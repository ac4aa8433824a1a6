"""blip2-dist: LoRA fine-tuning of BLIP-2 for captioning on DeepSpeed ZeRO-2 with WebDataset shards."""
