"""Library parts of the trainer (the loop itself is ``pipelines/train.py``).

- :mod:`~giblet.training.config`: the train config's schema and checks; what defines a run (for resuming).
- :mod:`~giblet.training.distributed`: process group, device, DDP, RNG state.
- :mod:`~giblet.training.schedule`: AdamW (8-bit on CUDA when asked) and the step-counted LR schedule.
- :mod:`~giblet.training.losses`: per-modality losses with explicit weights; per-voxel Pearson r.
- :mod:`~giblet.training.checkpoint`: atomic rank-0 checkpoints, mmap'd ``weights_only`` loads, the
  resume rules (``resume=true|false|weights_only``).
- :mod:`~giblet.training.diagnostics`: the JSONL log, grad norms per module, the scale check.
"""
