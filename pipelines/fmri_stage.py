"""fMRI stage wiring: one ``fmri/mask`` unit, then one unit per (subject, run) -- or per
subject with ``fmri.zscore=subject``.

An fMRI unit serves the first ``min(its TRs, its run's stimulus TRs)`` TRs of the BOLD
file and z-scores exactly those: the run's stimulus units decide the count, so the unit
depends on them and binds the count once they are committed (``pipelines.units``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from giblet import store
from giblet.config import mask_threshold
from giblet.features import confounds, fmri
from giblet.fingerprint import non_default_params
from pipelines.targets_stage import plan_targets
from pipelines.units import PlanContext, Stage, Task, Unit

STIMULUS_STAGES = ("video", "audio", "text")


class FmriStage(Stage):
    name = "fmri"
    version = fmri.VERSION

    def enabled(self, cfg) -> bool:
        return bool(cfg.subjects)

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        cfg, p = ctx.cfg, ctx.cfg.fmri
        runs = cfg.study_runs
        pairs = {(s, r.name): cfg.input_path(path) for r in runs.values() for s, path in r.fmri.items()}
        ref_subject = p.mask_reference or cfg.subjects[0]
        ref_run = next(r.name for r in runs.values() if ref_subject in r.fmri)
        ref_label = f"{ref_subject}/{ref_run}"
        # Header-only checks up front, so a bad run fails before any compute.
        ref_img = fmri.load_bold(pairs[ref_subject, ref_run], ref_label)
        lengths, header_tr = {}, {}
        for (s, r), path in pairs.items():
            img = fmri.load_bold(path, f"{s}/{r}")
            fmri.check_same_grid(img, ref_img, f"{s}/{r}", ref_label)
            header_tr[s, r] = fmri.check_tr(img, path, f"{s}/{r}", cfg.tr_s, p.trust_config_tr)
            lengths[s, r] = int(img.shape[3])

        params = non_default_params(p)
        mask_params = {k: v for k, v in params.items() if k.startswith("mask_")}
        mask_params["reference"] = ref_label
        mask = self._mask_unit(ctx, pairs, ref_label, pairs[ref_subject, ref_run], ref_img, mask_params)
        # target sets are units of their own (pipelines.targets_stage): adding one rebuilds no voxel unit
        subj_params = {k: v for k, v in params.items() if not k.startswith("mask_") and k != "targets"}
        if p.high_pass is not None:
            subj_params["tr_s"] = cfg.tr_s  # the filter depends on the sampling rate
        confound_files = _confound_files(p.confounds, pairs, lengths) if confounds.active(p.confounds) else {}
        groups: dict[str, list[tuple[str, str]]] = {}  # unit key -> its (subject, run) pairs
        for s, r in pairs:
            key = f"fmri/{s}/{r}" if p.zscore == "run" else f"fmri/{s}"
            groups.setdefault(key, []).append((s, r))
        units, mask_fp = [mask], mask.fingerprint  # once: it hashes every run's mask file with fmriprep
        voxels = int(np.prod(ref_img.shape[:3]))
        for key, members in groups.items():
            units.append(self._unit(ctx, key, members, pairs, lengths, header_tr, mask, mask_fp, subj_params,
                                    upstream, confound_files))
            units[-1].cells = voxels * sum(lengths[m] for m in members)  # pipelines.cluster: the in-process rule
        if p.targets:
            units += plan_targets(ctx, groups, {u.key: u for u in units}, mask, mask_fp, ref_img, list(pairs.values()))
        return units

    def _mask_unit(self, ctx: PlanContext, pairs: dict, ref_label: str, ref_path: Path, ref_img, params: dict) -> Unit:
        """``fmri/mask``: computed from the reference run, read from ``fmri.mask_file``, or combined
        from every run's fMRIPrep brain mask (grids checked here, headers only)."""
        from giblet.bids import derivative_file

        p = ctx.cfg.fmri
        mask_file = ctx.cfg.input_path(p.mask_file) if p.mask_strategy == "file" else None
        masks = []
        if p.mask_strategy == "fmriprep":
            masks = [(f"{s}/{r}", str(derivative_file(path, "brain", "mask", ".nii.gz"))) for (s, r), path in pairs.items()]
            for label, path in masks:
                fmri.load_mask(path, label, ref_img, ref_label, load=False)
            inputs = {f"mask/{label}": ctx.file_fp(Path(path)) for label, path in masks}
        elif mask_file:
            inputs = {"mask_file": ctx.file_fp(mask_file)}
        else:
            inputs = {"reference": ctx.file_fp(ref_path)}
        if mask_file:
            params.pop("reference")

        def mask_tasks(unit: Unit, staging: Path) -> list[Task]:
            return [Task("mask", fmri.build_mask, dict(
                staging=str(staging), strategy=p.mask_strategy, reference=str(ref_path), ref_label=ref_label,
                mask_file=str(mask_file) if mask_file else None, block_trs=p.read_block_trs, mask_trs=p.mask_trs,
                masks=masks, rule=p.mask_rule, threshold=mask_threshold(p.mask_rule)))]

        return Unit("fmri/mask", self.name, self.version, params, inputs, mask_tasks, [store.MASK, store.VOXELS],
                    label="fMRI mask")

    def _unit(self, ctx: PlanContext, key: str, members: list, pairs: dict, lengths: dict, header_tr: dict,
              mask: Unit, mask_fp: str, params: dict, upstream: dict, confound_files: dict) -> Unit:
        cfg, p = ctx.cfg, ctx.cfg.fmri
        subject = members[0][0]
        run_names = [r for _, r in members]
        stimulus = {r: [f"{st}/{r}" for st in STIMULUS_STAGES] for r in run_names}  # the units that may exist
        deps = [mask.key] + [k for r in run_names for k in stimulus[r] if k in upstream]

        def bind(manifest_units: dict) -> dict:
            """TRs served per run: the file's, cut to what the run's committed stimulus units cover."""
            served = {}
            for _, r in members:
                covered = [int(manifest_units[k]["meta"]["n_trs"]) for k in stimulus[r]
                           if k in manifest_units and (manifest_units[k].get("meta") or {}).get("n_trs") is not None]
                served[r] = min([lengths[subject, r]] + covered)
            return {"served_trs": served}

        def tasks(unit: Unit, staging: Path) -> list[Task]:
            served = unit.bound["served_trs"]
            return [Task(subject, fmri.build_subject, dict(
                staging=str(staging), store_path=str(ctx.store), subject=subject,
                runs=[{"run": r, "path": str(pairs[subject, r]), "n_trs": served[r], "file_trs": lengths[subject, r]}
                      for r in run_names],
                tr_s=cfg.tr_s, detrend=p.detrend, high_pass=p.high_pass, zero_variance=p.zero_variance,
                chunk_trs=p.chunk_trs, block_trs=p.read_block_trs, zscore=p.zscore,
                confounds=params.get("confounds")))]

        def finalize(unit: Unit, staging: Path, results: dict) -> dict:
            meta = results[subject]
            for r in run_names:
                meta["runs"][r].update(file_trs=lengths[subject, r], header_tr_s=header_tr[subject, r],
                                       trust_config_tr=p.trust_config_tr)
            return meta

        inputs = ({"bold": ctx.file_fp(pairs[members[0]])} if len(members) == 1 and p.zscore == "run"
                  else {f"bold/{r}": ctx.file_fp(pairs[subject, r]) for r in run_names})
        inputs["mask"] = mask_fp
        for r in run_names if confound_files else ():  # the table nilearn reads, and its JSON (CompCor's metadata)
            tsv = confound_files[subject, r]
            inputs[f"confounds/{r}"] = ctx.file_fp(tsv)
            if tsv.with_suffix(".json").is_file():
                inputs[f"confounds_json/{r}"] = ctx.file_fp(tsv.with_suffix(".json"))
        arrays = [a for r in run_names for a in fmri.array_names(subject, r).values()]
        return Unit(key, self.name, self.version, params, inputs, tasks, arrays, deps=deps, finalize=finalize,
                    bind=bind, label=f"fMRI {key[5:]}", run=run_names[0] if p.zscore == "run" else None)


def _confound_files(c, pairs: dict, lengths: dict) -> dict:
    """(subject, run) -> its fMRIPrep confounds file. The settings ``c`` are tried on the first
    pair here, so a wrong option or a column every file lacks fails before any compute."""
    found = {(s, r): confounds.confounds_file(path, f"{s}/{r}") for (s, r), path in pairs.items()}
    (s, r), path = next(iter(pairs.items()))
    confounds.load(path, c, lengths[s, r], lengths[s, r], f"{s}/{r}")
    return found
