"""Library parts of the trainer (the loop itself is ``pipelines/train.py``).

- :mod:`~giblet.training.distributed`: process group, device, DDP, RNG state.
- :mod:`~giblet.training.schedule`: AdamW (8-bit on CUDA when asked) and the step-counted LR schedule.
- :mod:`~giblet.training.losses`: per-modality losses with explicit weights; per-voxel Pearson r.
- :mod:`~giblet.training.checkpoint`: atomic rank-0 checkpoints, mmap'd ``weights_only`` loads.
- :mod:`~giblet.training.diagnostics`: the JSONL log, grad norms per module, the scale check.
"""
