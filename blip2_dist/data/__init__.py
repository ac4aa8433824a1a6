"""Data: source layouts, the shard packer, the streaming loader, the synthetic set."""
