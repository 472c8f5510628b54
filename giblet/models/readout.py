"""The fMRI readout: one shared head plus a per-subject low-rank correction (issue 19).

Brains differ: the same stimulus feature drives a voxel in one subject and not (or with the
opposite sign) in another. A head shared by every subject can only predict their average,
so each subject gets its own correction of the shared head::

    x      = temporal filter over the window's bottleneck       (batch, d)      shared
    shared = W x + b                                            (batch, voxel)  shared
    fmri   = shared + sum_k c[k] * U_k (P_k x)                  (batch, voxel)
             c[k] = [k == s] - 1 / S  for a training subject s; 0 for any other

``P_k`` ``(rank, d)`` picks the subject's own ``rank`` directions of the bottleneck and
``U_k`` ``(voxel, rank)`` maps them to its voxels (with ``rank >= d``, ``P_k`` is the identity:
a full per-subject head). The corrections are *centred* (the ``- 1/S`` term): their mean
over the training subjects is exactly zero, so

- the shared head **is** the average training subject: the mean of the training subjects'
  predictions equals ``W x + b`` exactly, for any weights;
- a subject unseen in training (index -1, or a name the model was not trained on) gets
  that shared prediction -- the best guess for a new brain is the average of the known ones.

With one training subject the correction is zero and the readout is the shared head.
``U`` starts at zero (the readout starts as the shared head, as LoRA starts at the base
model) and ``P`` at random orthogonal rows; both are matrices, so AdamW decays them.

Cost: ``S * rank * (voxel + d)`` parameters; the compute is one ``(batch, S * rank) @ (S *
rank, voxel)`` matmul (the subject one-hot times the ``P_k x``), the same for any mix of
subjects in a batch, so DDP sees every parameter get a gradient every step and
``torch.compile`` sees one graph. At Sherlock scale on ``configs/train/gpu.yaml`` (17
subjects, 69,397 voxels, ``d_bottleneck: 512``, ``readout_rank: 32``) that is
17 x 32 x (69,397 + 512) = 38.0 M parameters beside the shared head's 35.6 M; full
per-subject heads would be 604 M.

The temporal filter (per bottleneck channel, initialised to the Glover HRF) stays shared:
timing differs more between regions than between subjects, which neither a per-subject
nor a per-channel filter can express; a per-subject filter would cost little (``S * d *
window``) but would make the correction non-linear in the subject (filter x head), and the
shared head would stop being exactly the average subject.

Subjects are names (``ModelSpec.subjects``, the training store's): a dataset that serves
another list (a subset, another order) is mapped by name with :func:`subject_table`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

READOUTS = ("subject", "shared")
UNSEEN = -1  # subject index of a brain the model was not trained on: the shared prediction


def subject_table(model_subjects: Sequence[str], names: Sequence[str], device=None) -> torch.Tensor:
    """Dataset subject indices -> model subject indices, by name.

    Args:
        model_subjects: the model's subjects (``ModelSpec.subjects``).
        names: the dataset's subjects (``GibletDataset.subjects``), in its index order.

    Returns:
        ``(len(names) + 1,) int64``: ``table[i]`` is the model index of ``names[i]``, or
        :data:`UNSEEN` for a name the model was not trained on; the last entry is
        :data:`UNSEEN` too, so ``table[subject]`` maps a dataset's -1 (no subject) to -1.
    """
    index = {name: i for i, name in enumerate(model_subjects)}
    return torch.tensor([index.get(n, UNSEEN) for n in names] + [UNSEEN], dtype=torch.int64, device=device)


class SubjectReadout(nn.Module):
    """Filtered bottleneck ``(batch, d)`` + subject ``(batch,)`` -> ``(batch, voxel)``; see the module docstring.

    Args:
        d_in: bottleneck width ``d``.
        n_voxels: targets.
        n_subjects: training subjects ``S`` (0 or ``readout="shared"``: the shared head only).
        rank: rank of each subject's correction (``>= d_in``: a full per-subject head).
    """

    def __init__(self, d_in: int, n_voxels: int, n_subjects: int, rank: int):
        super().__init__()
        self.shared = nn.Linear(d_in, n_voxels)
        nn.init.zeros_(self.shared.weight)  # start at the z-scored mean: the fMRI loss starts at ~1
        nn.init.zeros_(self.shared.bias)
        self.n_subjects, self.rank = n_subjects, min(rank, d_in)
        if n_subjects:
            self.up = nn.Parameter(torch.zeros(n_subjects * self.rank, n_voxels))  # the U_k, stacked
            if self.rank < d_in:
                down = torch.empty(n_subjects, self.rank, d_in)
                for k in range(n_subjects):
                    nn.init.orthogonal_(down[k])
                self.down = nn.Parameter(down)  # the P_k
            else:
                self.down = None

    def forward(self, x: torch.Tensor, subject: torch.Tensor | None) -> torch.Tensor:
        out = self.shared(x)
        if not self.n_subjects or subject is None:
            return out
        s = self.n_subjects
        known = ((subject >= 0) & (subject < s)).to(x.dtype).unsqueeze(1)  # (batch, 1)
        onehot = nn.functional.one_hot(subject.clamp(0, s - 1), s).to(x.dtype)
        coeff = (onehot - 1.0 / s) * known  # (batch, S): centred, 0 for an unseen subject
        proj = x.unsqueeze(1) if self.down is None else torch.einsum("krd,bd->bkr", self.down, x)  # (batch, S, rank)
        h = (coeff.unsqueeze(2) * proj).reshape(len(x), s * self.rank)  # (batch, S * rank)
        return out + h @ self.up

    def extra_repr(self) -> str:
        return f"subjects={self.n_subjects}, rank={self.rank}"

    def describe(self) -> str:
        """One line for the run's start-up: what reads the voxels out, and its parameters."""
        d, v = self.shared.in_features, self.shared.out_features
        shared = f"shared head {d} -> {v} voxels ({(d + 1) * v / 1e6:.3g} M parameters)"
        if not self.n_subjects:
            return f"{shared}, no per-subject part (model.readout=shared)"
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("shared."))
        kind = "a full head" if self.down is None else f"a rank-{self.rank} correction"
        return (f"{shared} + {kind} per training subject x {self.n_subjects} ({n / 1e6:.3g} M parameters); "
                f"other subjects get the shared head")


def readout_parameters(d_in: int, n_voxels: int, n_subjects: int, rank: int) -> dict[str, int]:
    """Parameter counts: ``{"shared", "subjects"}`` (the per-subject corrections)."""
    r = min(rank, d_in)
    per = n_subjects * r * (n_voxels + (d_in if r < d_in else 0))
    return {"shared": d_in * n_voxels + n_voxels, "subjects": per}
