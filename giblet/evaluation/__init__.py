"""How well a model predicts brain responses, the field's way (issue 19).

Encoding models are scored by a Pearson r per target (voxel, parcel or vertex) computed
**per subject** on held-out TRs, then summarized (mean, median, top decile, per subject) --
never one r over samples pooled across subjects, which rewards predicting each subject's
mean and hides subjects the model fails on.

- :mod:`giblet.evaluation.metrics`: the r per target and its summaries (numpy), and the
  torch accumulator the trainer validates with (:class:`~giblet.evaluation.metrics.SubjectCorrelation`).
- :mod:`giblet.evaluation.features`: the store's stimulus features per TR, FIR-delayed within runs.
- :mod:`giblet.evaluation.ridge`: the per-subject ridge baseline (himalaya), scored the same way.
- :mod:`giblet.evaluation.ceiling`: the leave-one-subject-out ISC noise ceiling, cached in the store.

Library code: numpy, scipy, nilearn; torch only where a docstring says so. No argparse, no
Dask client at import.
"""
