"""Reading stored pretrained features: the part of ``giblet.reader.StoreView`` that serves them.

A stored layer is named ``features/<extractor>/layer-<k>`` (its path under each run's
``stimuli/<run>/``). It is served like every stimulus array, cut to the run's grid; a text
extractor's ``has_words`` says which TRs have words of their own (their rows are zeros
otherwise), :meth:`FeatureReader.feature_mask` serves it (all True for video and audio).
"""
from __future__ import annotations

from functools import cached_property
from typing import Optional

import numpy as np

from giblet.errors import ModalityMissingError, StoreError
from giblet.features.pretrained import MASK, SPEC, parse_spec
from giblet.manifest import STIMULI, stimulus_prefix


class FeatureReader:
    """Mixed into ``StoreView`` (which provides ``_arrays``, ``array``, ``run``, ``n_trs``, ``split``)."""

    def feature_names(self) -> list[str]:
        """Stored pretrained-feature layers, ``features/<extractor>/layer-<k>`` (of any run)."""
        return sorted({a.split("/", 2)[2] for a in self._arrays
                       if a.startswith(STIMULI + "/") and SPEC.fullmatch(a.split("/", 2)[2])})

    def feature_runs(self, spec: str) -> list[str]:
        """The runs that store ``spec``."""
        return [r for r in self.runs if f"{stimulus_prefix(r, '')}{spec}" in self._arrays]

    def _feature_path(self, spec: str, run: str) -> str:
        parse_spec(spec)
        path = f"{stimulus_prefix(run, '')}{spec}"
        if path not in self._arrays:
            raise ModalityMissingError(f"{self.path}: run {run!r} has no {spec} (stored: "
                                       f"{', '.join(self.feature_names()) or 'none'}); add the extractor to the "
                                       f"config's features block and rerun")
        return path

    def _trs(self, run: str, trs: Optional[slice]) -> slice:
        n = self.n_trs(run)
        return slice(0, n) if trs is None else slice(*trs.indices(n))

    def feature(self, spec: str, run: Optional[str] = None, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr, embedding) float32``: one stored layer, e.g. ``feature("features/clip/layer-6",
        "run-1")``, cut to the run's grid (zeros where ``feature_mask`` is False)."""
        run = self.run(run)
        arr = self.array(self._feature_path(spec, run))
        if arr.shape[0] < self.n_trs(run):
            raise StoreError(f"{self.path}: {spec} of run {run} stores {arr.shape[0]} TRs but the run serves "
                             f"{self.n_trs(run)}; rebuild it (`giblet-preprocess run CONFIG --only features --force`)")
        return np.asarray(arr[self._trs(run, trs)], dtype=np.float32)

    def feature_mask(self, spec: str, run: Optional[str] = None, trs: Optional[slice] = None) -> np.ndarray:
        """``(tr,) bool``: True where the TR has input of its own (a text extractor's
        ``has_words``; all True for video and audio extractors)."""
        run = self.run(run)
        mask = f"{self._feature_path(spec, run).rsplit('/', 1)[0]}/{MASK}"
        sel = self._trs(run, trs)
        if mask not in self._arrays:
            return np.ones(len(range(sel.start, sel.stop)), dtype=bool)
        return self.array(mask)[sel]

    def feature_stats(self, spec: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension ``(mean, std)`` (ddof 0) of ``spec`` over the training TRs of every run
        that stores it, TRs without input of their own left out (all TRs of those runs when the
        training split has none)."""
        from giblet.features.text import covered_stats

        if spec not in self._feature_stats:
            runs = self.feature_runs(spec)
            if not runs:
                self._feature_path(spec, self.runs[0])  # the clear "no such array" error
            train = self.split["train"]
            spans = {r: train[r] for r in runs if r in train} or {r: (0, self.n_trs(r)) for r in runs}
            x = np.concatenate([self.feature(spec, r, slice(*ab)) for r, ab in spans.items()])
            m = np.concatenate([self.feature_mask(spec, r, slice(*ab)) for r, ab in spans.items()])
            self._feature_stats[spec] = covered_stats(x, m if m.any() else np.ones(len(m), bool))
        return self._feature_stats[spec]

    @cached_property
    def _feature_stats(self) -> dict:
        return {}
