"""Training: the loop, deterministic batches, optimizer groups, schedules, engines (DDP,
FSDP2, DeepSpeed), the divergence guard, experiment trackers and the memory estimate."""
