"""Task outputs -> the store's arrays.

Each task saves its TRs' rows per array as ``.npy`` files in the unit's staging folder
(``parts/<tr0>/<array>.npy``, already in the stored dtype), so a killed run resumes per
task like every stage; the unit's ``finalize`` (driver) then knows every array's width --
learnt from the model's forward, not guessed from its config (hierarchical models change
width from layer to layer) -- and writes each array whole, one at a time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from giblet import store
from giblet.errors import InputError

PARTS = "parts"


def save_part(staging: str | Path, tr0: int, arrays: dict[str, np.ndarray], out_dtype: str) -> None:
    """Save one task's rows: ``{local name: (tr, ...)}``; float arrays cast to ``out_dtype``."""
    folder = Path(staging) / PARTS / f"{tr0:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in arrays.items():
        rows = rows.astype(out_dtype) if rows.dtype.kind == "f" else rows
        tmp = folder / f".{name}.tmp.npy"
        np.save(tmp, rows)
        tmp.replace(folder / f"{name}.npy")  # whole or absent: a killed task leaves no half part


def write_arrays(staging: Path, names: dict[str, str], n_trs: int, chunk_trs: int, attrs: dict[str, dict],
                 where: str) -> dict[str, list[int]]:
    """Create each array of ``names`` (local name -> store path) from the tasks' parts.

    Args:
        n_trs: rows kept (parts past it are dropped: an audio source shorter than allotted).
        attrs: local name -> the array's attributes.

    Returns:
        local name -> the array's shape.
    """
    starts = sorted(int(p.name) for p in (staging / PARTS).iterdir() if p.name.isdigit() and int(p.name) < n_trs)
    shapes = {}
    for local, path in names.items():
        rows = np.concatenate([np.load(staging / PARTS / f"{t:08d}" / f"{local}.npy") for t in starts])[:n_trs]
        if len(rows) != n_trs:
            raise InputError(f"{where}: the tasks produced {len(rows)} of {n_trs} TRs for {path}; the input changed "
                             f"during the run: rerun")
        dims = (store.TR, store.EMBEDDING)[:rows.ndim]
        arr = store.create_array(staging, path, rows.shape, rows.dtype.name, (chunk_trs,) + rows.shape[1:], dims,
                                 attrs.get(local, {}), **({"fill_value": False} if rows.dtype == bool else {}))
        arr[...] = rows
        shapes[local] = list(rows.shape)
    return shapes
