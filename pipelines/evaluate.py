"""``giblet-evaluate``: score a trained run (or the ridge baseline) the field's way, with maps.

    giblet-evaluate RUN_DIR [--split val|test] [--out DIR] [--store STORE] [--device DEV] [--no-ceiling]
    giblet-evaluate --baseline ridge --store STORE [--split val|test] [--out DIR] [--no-ceiling]
                    [--features features/<extractor>/layer-<k> ...] [--target voxels|parcels/<name>|...]

A run: the model is rebuilt from the run's config (the ``config`` record of ``log.jsonl``) and
its ``checkpoint.pt`` (``weights_only``, validated, shape-checked), then run over every TR of
the split for every subject of the store, in (subject, run, TR) order with the trainer's
context windows (a subject the run did not train on gets the shared, average-subject
prediction). Each subject's ``(tr, voxel)`` predictions are scored with
``giblet.evaluation.metrics.pearson_r`` against its z-scored BOLD -- the same figures the
trainer's validation logs. The baseline: ``giblet.evaluation.ridge.ridge_baseline``, on the
voxels or on the target set ``--target`` names (a run: the target it trained on, ``data.target``).

Both: the noise ceiling on the same targets (``giblet.evaluation.ceiling.noise_ceiling``,
cached in the store per split and target) and the fraction of it reached
(``metrics.ceiling_fraction``); r and ceiling maps (NIfTI; a target set: TSV or GIFTI), PNG
figures and ``summary.json`` (``giblet.evaluation.maps``) in ``--out``; a table on stdout.
Exit codes as every giblet command: 0, 1 (one line; ``--debug`` for the traceback), 2 (usage).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from giblet.errors import ConfigError, InputError, InputMissingError, StoreError
from pipelines.errors import one_line_errors

PROG = "giblet-evaluate"
SPLITS = ("val", "test")
_RUN_FIX = "pass the out= folder of a giblet-train run, or use --baseline ridge --store STORE"


# -- what is evaluated -----------------------------------------------------------------------------
def open_view(store: str | Path, what: str):
    from giblet.location import is_url
    from giblet.reader import open_store

    if not is_url(store) and not Path(store).exists():  # a URL: open_store says what is wrong with it
        raise StoreError(f"{store}: no such store ({what}); build it with `giblet-preprocess run CONFIG`, or pass "
                         f"--store with the store's path")
    return open_store(store)


def check_split(view, split: str) -> dict[str, int]:
    """subject -> TRs of ``split`` it serves (summed over runs); refuses a split without TRs."""
    n = {s: sum(np.diff(view.split_trs(split, r, s))[0] for r in view.subject_runs(s)) for s in view.subjects}
    if not view.subjects or not any(n.values()):
        raise StoreError(f"{view.path}: split {split!r} has no TR for any subject (split rule "
                         f"{view.align.get('split_rule')}); choose another --split, or set split.val_fraction / "
                         f"split.val_runs / split.test_runs and rerun `giblet-preprocess run CONFIG`")
    return {s: int(v) for s, v in n.items() if v}


def read_run_config(run_dir: Path):
    """The run's ``TrainConfig``, rebuilt (and re-checked) from the last ``config`` record of its log."""
    from giblet.config import build_config
    from giblet.training.config import TrainConfig, check_train

    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise InputError(f"{run_dir}: has no log.jsonl, so its config is unknown; {_RUN_FIX}")
    record = None
    for i, line in enumerate(log.read_text().splitlines(), 1):
        try:
            rec = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as exc:
            raise InputError(f"{log}: line {i} is not JSON ({exc.msg}); {_RUN_FIX}") from None
        if rec.get("kind") == "config":
            record = rec
    if record is None or not isinstance(record.get("config"), dict):
        raise InputError(f"{log}: no config record (giblet-train writes one at step 0); {_RUN_FIX}")
    raw = {k: v for k, v in record["config"].items() if k != "config_path"}
    return build_config(TrainConfig, raw, config_path=str(log), check=check_train)


def load_model(run_dir: str | Path, store: Optional[str], split: str, device: str):
    """``(model, dataset, cfg, state, view)``: the run's model on ``device`` and the split's dataset.

    Raises:
        InputError: not a run folder; ConfigError: a checkpoint that does not load or fit;
        StoreError: a missing store, or one whose content differs from the run's.
    """
    import torch

    from giblet.data import GibletDataset
    from giblet.models.autoencoder import GibletAutoencoder
    from giblet.training import checkpoint as ckpt
    from giblet.training.config import shape_identity, store_fingerprint
    from pipelines.train import dataset_kwargs, model_spec

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputMissingError(f"{run_dir}: no such folder; {_RUN_FIX}")
    path = ckpt.checkpoint_path(run_dir)
    if not path.is_file():
        raise InputError(f"{run_dir}: no {path.name}, so it is not a giblet-train run folder (or the run never "
                         f"reached a checkpoint); {_RUN_FIX}")
    cfg = read_run_config(run_dir)
    state = ckpt.load_checkpoint(run_dir)
    view = open_view(store or cfg.store, "--store" if store else f"the store of {run_dir / 'log.jsonl'}")
    check_split(view, split)
    trained_on, now = state["run"].get("store"), store_fingerprint(view)
    if trained_on != now:
        raise StoreError(f"{view.path}: its content (fingerprint {now}) is not the store {run_dir} trained on "
                         f"({trained_on}); a rebuilt store may hold other TRs in {split!r}; pass --store with the "
                         f"run's store, or retrain")
    ds = GibletDataset(view.path, split, **{**dataset_kwargs(cfg, view), "subjects": None})  # every subject
    trained = state["shape"].get("subjects") or cfg.data.subjects or list(view.subjects)
    spec = dataclasses.replace(model_spec(ds, cfg, view), subjects=tuple(trained))
    ckpt.check_shape(state, shape_identity(spec, cfg.model), path)
    model = GibletAutoencoder(cfg.model, spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(f"{path}: its weights do not load into the run's model ({str(exc).splitlines()[0]}); "
                          f"was the checkpoint copied from another run?") from None
    try:
        dev = torch.device(device)
        model.to(dev)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"--device {device!r}: {str(exc).splitlines()[0]}; use --device cpu") from None
    return model.eval(), ds, cfg, state, view


def model_scores(model, ds, cfg, device: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Each subject's ``(voxel,)`` r over all its samples of ``ds``, and its TR count.

    The dataset lists samples subject after subject, so one subject's ``(tr, voxel)``
    predictions and targets are held at a time, scored when the next subject starts.
    """
    from functools import partial

    import torch

    from giblet.evaluation.metrics import pearson_r
    from giblet.models.autoencoder import prepare_batch

    table = model.subject_table(ds.subjects, device)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.data.val_batch_size, shuffle=False,
                                         collate_fn=partial(prepare_batch, video_frames=cfg.model.video_frames))
    rs, n_trs, held = {}, {}, {"subject": None, "pred": [], "target": []}

    def flush():
        if held["subject"] is not None:
            name = ds.subjects[held["subject"]]
            pred, target = np.concatenate(held["pred"]), np.concatenate(held["target"])
            rs[name], n_trs[name] = pearson_r(pred, target).astype(np.float32), len(target)
        held.update(pred=[], target=[])

    with torch.no_grad():
        for batch in loader:
            subject, run = batch["subject"].numpy(), batch["run"].numpy()
            inputs = {k: v.to(device) for k, v in batch.items()}
            inputs["subject"] = table[inputs["subject"]]
            pred = model(inputs)["fmri"].float().cpu().numpy()
            if cfg.loss.fmri_target == "raw":  # scored on z-scores, through the store's own ZScorers
                pred = np.stack([ds.scaler(int(s), int(r)).transform(p) for p, s, r in zip(pred, subject, run)])
            target = batch["fmri"].numpy()
            for s in dict.fromkeys(subject.tolist()):  # in order of appearance: ascending
                if s != held["subject"]:
                    flush()
                    held["subject"] = s
                held["pred"].append(pred[subject == s])
                held["target"].append(target[subject == s])
    flush()
    return rs, n_trs


def check_target(view, target: str) -> str:
    """``--target`` checked against the store's target sets (one line naming them if it is not one)."""
    if target != "voxels" and target not in view.targets:
        raise StoreError(f"{view.path}: --target {target!r} is not a target set of this store (it serves: "
                         f"{', '.join(['voxels', *view.targets])}); pass one of those, or add the set to fmri.targets "
                         f"and rerun `giblet-preprocess run CONFIG`")
    return target


def ridge_scores(view, split: str, arrays: tuple = (), target: str = "voxels") -> tuple[dict[str, np.ndarray], dict]:
    """``(subject -> (column,) r, what)`` of the ridge baseline on ``split`` (``arrays``: stored
    pretrained-feature layers as its only features; ``target``: the voxels or a target set's columns)."""
    from giblet.evaluation.features import FeatureParams
    from giblet.evaluation.ridge import DEFAULT_ALPHAS, ridge_baseline

    params = FeatureParams(arrays=tuple(arrays))
    result = ridge_baseline(view, params=params, target=target)
    what = {"kind": "ridge baseline", "features": dataclasses.asdict(params),
            "alphas": list(DEFAULT_ALPHAS), "solver": result.solver, "fit_s": result.fit_s,
            "skipped": result.skipped}
    return result.r.get(split, {}), what


def store_ceiling(view, split: str, subjects, target: str = "voxels") -> tuple[Optional[dict[str, np.ndarray]],
                                                                              Optional[str]]:
    """``(subject -> (column,) ceiling, note)`` on ``target`` (the voxels or a target set's columns,
    each cached under its own name): None and why when the store has < 2 subjects."""
    from giblet.evaluation.ceiling import noise_ceiling

    if len(view.subjects) < 2:
        return None, (f"noise ceiling skipped: the store has {len(view.subjects)} subject(s) with fMRI, and a "
                      f"leave-one-subject-out ceiling needs >= 2")
    note = None
    try:
        nc = noise_ceiling(view, split, target=target)
    except PermissionError:  # a read-only store: compute it, keep nothing
        nc = noise_ceiling(view, split, cache=False, target=target)
        note = "noise ceiling not cached: the store is read-only"
    return {s: nc.isc[i] for i, s in enumerate(nc.subjects) if s in subjects}, note


# -- outputs ---------------------------------------------------------------------------------------
def write_outputs(out: Path, view, rs: dict, ceilings: Optional[dict], title: str, target: str = "voxels") -> dict:
    """NIfTI maps and PNGs in ``out`` (a target set: its tables or GIFTIs -- r and ceiling --, the
    violins and r vs ceiling; no glass brain); returns the ``files`` entry of the summary (absolute paths)."""
    from giblet.evaluation import maps

    if target != "voxels":
        info, title = view.target_info(target), f"{title}, {target}"
        files = {"r_maps": maps.save_target_maps(rs, info, out, "r")}
        column = "vertex" if info["kind"] == "surface" else "parcel"
        figures = {"per_subject": maps.plot_subject_violins(rs, out / "r_per_subject.png", title, ceilings, column)}
        if ceilings:
            files["ceiling_maps"] = maps.save_target_maps(ceilings, info, out, "ceiling")
            figures["r_vs_ceiling"] = maps.plot_r_vs_ceiling(rs, ceilings, out / "r_vs_ceiling.png", title)
        files["figures"] = figures
        return json.loads(json.dumps(files, default=lambda p: str(Path(p).resolve())))

    maps.check_voxel_order(view.voxels, view.mask, str(view.path))
    mask_img = maps.mask_image(view.mask, view.affine)
    files = {"r_maps": maps.save_maps(rs, mask_img, out, "r")}
    figures = {"glass_brain": maps.plot_glass_brains({s: maps.to_image(r, mask_img) for s, r in rs.items()},
                                                     out / "r_glass_brain.png", f"Pearson r per voxel: {title}"),
               "per_subject": maps.plot_subject_violins(rs, out / "r_per_subject.png", title, ceilings)}
    if ceilings:
        files["ceiling_maps"] = maps.save_maps(ceilings, mask_img, out, "ceiling")
        figures["r_vs_ceiling"] = maps.plot_r_vs_ceiling(rs, ceilings, out / "r_vs_ceiling.png", title)
    files["figures"] = figures
    return json.loads(json.dumps(files, default=lambda p: str(Path(p).resolve())))


def table(summary: dict) -> str:
    """The short stdout table: one row per subject, then the across-subject figures."""
    ceil = (summary.get("ceiling") or {}).get("subjects", {})

    def num(v, pct=False):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")

    rows = [f"{'subject':<14}{'TRs':>6}{'mean r':>9}{'median':>9}{'top10':>9}{'ceiling':>9}{'of ceil':>9}"]
    for name, s in summary["subjects"].items():
        c = ceil.get(name, {})
        rows.append(f"{name:<14}{summary['n_trs'].get(name, 0):>6}{num(s['mean']):>9}{num(s['median']):>9}"
                    f"{num(s['top10']):>9}{num(c.get('mean')):>9}{num(c.get('fraction'), True):>9}")
    c = summary.get("ceiling") or {}
    rows.append(f"{'across':<14}{'':>6}{num(summary['mean']):>9}{num(summary['median']):>9}"
                f"{num(summary['top10']):>9}{num(c.get('mean')):>9}{num(c.get('fraction'), True):>9}")
    return "\n".join(rows)


def evaluate(args) -> dict:
    """The whole command; returns the summary written to ``OUT/summary.json``."""
    from giblet.evaluation import maps
    from giblet.store import atomic_write_json

    if args.baseline:
        view = open_view(args.store, "--store")
        target = check_target(view, args.target or "voxels")
        n_trs = check_split(view, args.split)
        rs, what = ridge_scores(view, args.split, tuple(args.features or ()), target)
        out = Path(args.out or f"giblet-evaluation-ridge-{args.split}")
        title = f"ridge baseline, {args.split}"
    else:
        model, ds, cfg, state, view = load_model(args.run_dir, args.store, args.split, args.device)
        rs, n_trs = model_scores(model, ds, cfg, args.device)
        trained = list(model.spec.subjects)
        what = {"kind": "model", "run_dir": str(Path(args.run_dir).resolve()), "step": int(state["step"]),
                "total_steps": int(state["total_steps"]), "readout": cfg.model.readout,
                "trained_subjects": trained, "unseen_subjects": [s for s in rs if s not in trained],
                "device": args.device}
        out = Path(args.out or Path(args.run_dir) / f"evaluation-{args.split}")
        title = f"{Path(args.run_dir).name} step {state['step']}, {args.split}"
        target = ds.target
    if not rs:
        raise StoreError(f"{view.path}: no subject could be scored on split {args.split!r}; choose another --split")
    ceilings, note = (None, "noise ceiling skipped (--no-ceiling)") if args.no_ceiling else \
        store_ceiling(view, args.split, rs, target)
    files = write_outputs(out, view, rs, ceilings, title, target)
    summary = {"evaluated": what, "store": str(view.path), "split": args.split, "target": target,
               "n_trs": {s: n_trs[s] for s in rs}, **maps.evaluation_summary(rs, ceilings)}
    summary["fraction_of_ceiling"] = (summary.get("ceiling") or {}).get("fraction")
    if note:
        summary["ceiling_note"] = note
    files["summary"] = str((out / "summary.json").resolve())
    summary["files"] = files
    atomic_write_json(out / "summary.json", maps.json_ready(summary))
    head = (f"model {what['run_dir']} (step {what['step']})" if not args.baseline else "ridge baseline")
    head += f" on {target}" if target != "voxels" else ""
    print(f"{PROG}: {head} on split {args.split!r} of {view.path}")
    print(table(summary))
    if note:
        print(note)
    print(f"wrote {len(files['r_maps'])} r map(s), {len(files.get('ceiling_maps', {}))} ceiling map(s), "
          f"{len(files['figures'])} figure(s) and {files['summary']}")
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Per-subject Pearson r maps, figures and a JSON summary of a "
                                                       "trained run or the ridge baseline, with the noise ceiling.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a giblet-train run folder (its out=)")
    p.add_argument("--baseline", choices=["ridge"], help="evaluate a baseline fitted on --store instead of a run")
    p.add_argument("--store", help="the store (required with --baseline; a run: default the store in its config)")
    p.add_argument("--split", choices=SPLITS, default="val", help="held-out TRs to score (default: val)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/evaluation-SPLIT, or "
                                 "./giblet-evaluation-ridge-SPLIT for the baseline)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the noise ceiling and the fraction of it")
    p.add_argument("--features", nargs="+", metavar="LAYER",
                   help="ridge baseline: fit on these stored pretrained-feature layers (features/<extractor>/"
                        "layer-<k>) instead of the raw modalities' features")
    p.add_argument("--target", metavar="ID",
                   help="ridge baseline: fit and score these columns -- voxels (default) or a target set of the "
                        "store (parcels/<name>, surface/<name>) -- with the ceiling on the same columns")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu; e.g. cuda)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.baseline and args.run_dir:
        p.error("give RUN_DIR or --baseline, not both")
    if not args.baseline and not args.run_dir:
        p.error("RUN_DIR is required (or --baseline ridge --store STORE)")
    if args.baseline and not args.store:
        p.error("--baseline ridge needs --store STORE")
    if args.features and not args.baseline:
        p.error("--features chooses the ridge baseline's features; add --baseline ridge")
    if args.target and not args.baseline:
        p.error("--target chooses the ridge baseline's targets; a run is scored on the target it trained on "
                "(its data.target); add --baseline ridge")

    def body() -> int:
        evaluate(args)
        return 0

    return one_line_errors(PROG, body, debug=args.debug,
                           interrupted="rerun the same command (the noise ceiling, once computed, is cached)")


if __name__ == "__main__":
    sys.exit(main())
