"""fMRI stage wiring: one ``fmri/mask`` unit, then one unit per subject."""
from __future__ import annotations

from pathlib import Path

from giblet.features import fmri
from giblet.fingerprint import non_default_params
from pipelines.registry import PlanContext, Stage, Task, Unit


class FmriStage(Stage):
    name = "fmri"
    version = fmri.VERSION

    def enabled(self, cfg) -> bool:
        return bool(cfg.inputs.fmri)

    def plan(self, ctx: PlanContext, upstream: dict) -> list[Unit]:
        cfg, p = ctx.cfg, ctx.cfg.fmri
        params = non_default_params(p)
        params.pop("read_block_trs", None)  # how the file is read, not what is stored
        subjects = {s: ctx.cfg.input_path(path) for s, path in cfg.inputs.fmri.items()}
        ref_subject = p.mask_reference or next(iter(subjects))
        # Header-only checks up front, so a bad subject fails before any compute.
        ref_img = fmri.load_bold(subjects[ref_subject], ref_subject)
        for s, path in subjects.items():
            fmri.check_same_grid(fmri.load_bold(path, s), ref_img, s, ref_subject)

        mask_file = cfg.input_path(p.mask_file) if p.mask_strategy == "file" else None
        mask_params = {k: v for k, v in params.items() if k.startswith("mask_")}
        mask_inputs = ({"mask_file": ctx.file_fp(mask_file)} if mask_file
                       else {"reference": ctx.file_fp(subjects[ref_subject])})
        if not mask_file:
            mask_params["reference_subject"] = ref_subject

        def mask_tasks(staging: Path) -> list[Task]:
            return [Task("mask", fmri.build_mask, dict(
                staging=str(staging), strategy=p.mask_strategy, reference=str(subjects[ref_subject]),
                ref_subject=ref_subject, mask_file=str(mask_file) if mask_file else None,
                block_trs=p.read_block_trs, mask_trs=p.mask_trs))]

        mask = Unit("fmri/mask", self.name, self.version, mask_params, mask_inputs, mask_tasks,
                    ["fmri/mask", "fmri/voxels"], label="fMRI mask")
        units = [mask]
        subj_params = {k: v for k, v in params.items() if not k.startswith("mask_")}
        if p.high_pass is not None:
            subj_params["tr_s"] = cfg.tr_s  # the filter depends on the sampling rate
        for s, path in subjects.items():
            units.append(self._subject_unit(ctx, s, path, mask, subj_params))
        return units

    def _subject_unit(self, ctx: PlanContext, subject: str, path: Path, mask: Unit, params: dict) -> Unit:
        cfg, p = ctx.cfg, ctx.cfg.fmri

        def tasks(staging: Path) -> list[Task]:
            return [Task(subject, fmri.build_subject, dict(
                staging=str(staging), store_path=str(ctx.store), subject=subject, path=str(path),
                tr_s=cfg.tr_s, detrend=p.detrend, high_pass=p.high_pass, zero_variance=p.zero_variance,
                chunk_trs=p.chunk_trs, block_trs=p.read_block_trs))]

        prefix = f"fmri/{subject}"
        return Unit(prefix, self.name, self.version, params,
                    {"bold": ctx.file_fp(path), "mask": mask.fingerprint}, tasks,
                    [f"{prefix}/bold", f"{prefix}/mean", f"{prefix}/std"], deps=[mask.key],
                    label=f"fMRI {subject}")
