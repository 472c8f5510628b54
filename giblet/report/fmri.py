"""The fMRI section: the mask, temporal SNR, the saved std, zero-variance voxels, carpet plots,
confounds and censored TRs.

Bounded reads: every ``(voxel,)`` mean and std (small), every ``(tr,)`` censored flag (tiny),
and for a carpet only a seeded sample of columns of a few (subject, run)s' ``bold`` -- zarr
decodes one chunk at a time and keeps only the sampled columns, so memory stays at a chunk.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from giblet.reader import StoreView
from giblet.report.page import Section, compact, figure, heading, para, png_bytes, table
from giblet.report.summary import pair_meta

CARPET_VOXELS = 300
MONTAGE_SLICES = 5
HIST_BINS = 60


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    return plt


def volume(values: np.ndarray, view_voxels: np.ndarray, shape: tuple) -> np.ndarray:
    """``(voxel,)`` values in store column order -> an ``(x, y, z) float32`` volume (0 outside)."""
    vol = np.zeros(shape, np.float32)
    vol[tuple(np.asarray(view_voxels).T)] = values
    return vol


def tsnr(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(voxel,)`` temporal SNR: mean / std in raw units (0 where std is 0: zero-variance)."""
    return np.divide(np.abs(mean), std, out=np.zeros_like(mean, dtype=np.float32), where=std > 0)


def fmri_section(view: StoreView, carpets: int = 3, seed: int = 0) -> Section:
    """Args: carpets: (subject, run)s drawn as carpet plots -- those with the lowest median tSNR."""
    sec = Section("fmri", "fMRI")
    pairs = [(s, r) for s in view.subjects for r in view.subject_runs(s)]
    if not view.has("fmri/mask") or not pairs:
        return sec.add(para("This store has no fMRI.", "muted"))
    mask, affine, voxels = view.mask, view.affine, view.voxels
    stats = {p: view.fmri_stats(*p) for p in pairs}
    snr = {p: tsnr(m, s) for p, (m, s) in stats.items()}
    censored = {p: view.censored(*p) for p in pairs}
    median = {p: float(np.median(v[v > 0])) if (v > 0).any() else 0.0 for p, v in snr.items()}
    ref = mask_reference(view, pairs)

    sec.add(heading("Mask"), mask_figure(volume(stats[ref][0], voxels, mask.shape), mask, affine, ref))
    sec.add(heading("Per (subject, run)"), pairs_table(view, pairs, stats, median, censored))
    group = np.median(np.stack([snr[p] for p in pairs]), axis=0)
    sec.add(heading("Temporal SNR"), group_tsnr_figure(volume(group, voxels, mask.shape), mask, affine, len(pairs)),
            montage_figure(view, pairs, {p: volume(v, voxels, mask.shape) for p, v in snr.items()}, mask, affine))
    sec.add(heading("Saved std"), std_figure(view, stats))
    chosen = sorted(pairs, key=lambda p: median[p])[:max(0, carpets)]
    if chosen:
        sec.add(heading("Carpet plots"), para(
            f"The {len(chosen)} (subject, run)s with the lowest median tSNR (of {len(pairs)}); a seeded sample of "
            f"{min(CARPET_VOXELS, view.n_voxels)} voxels each. giblet-preprocess report --carpets N draws more."))
        rng = np.random.default_rng(seed)
        cols = np.sort(rng.choice(view.n_voxels, min(CARPET_VOXELS, view.n_voxels), replace=False))
        sec.add(*(carpet_figure(view, p, cols, median[p]) for p in chosen))
    sec.add(heading("Confounds and censored TRs"), *confound_blocks(view, pairs, censored))
    return sec


def mask_reference(view: StoreView, pairs: list) -> tuple[str, str]:
    """The (subject, run) the mask was computed on (its ``reference`` attr), else the first."""
    ref = str(view.array("fmri/mask").attrs.get("reference") or "")
    subject, _, run = ref.partition("/")
    return (subject, run) if (subject, run) in pairs else pairs[0]


def pairs_table(view, pairs, stats, median, censored) -> str:
    rows, classes = [], []
    for p in pairs:
        meta = pair_meta(view, *p)
        zero = int((stats[p][1] == 0).sum())
        rows.append([*p, view.n_trs(p[1], p[0]), meta.get("file_trs"), meta.get("header_tr_s"), round(median[p], 1),
                     zero, int(censored[p].sum()), meta.get("raw_min"), meta.get("raw_max")])
        classes.append(["", "", "", "", "", "", "bad" if zero else "", "bad" if censored[p].any() else "", "", ""])
    return table(["subject", "run", "TRs served", "TRs in file", "header TR (s)", "median tSNR",
                  "zero-variance voxels", "censored TRs", "raw min", "raw max"], rows, classes)


def nifti(vol: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    return nib.Nifti1Image(vol, affine)


def cuts(mask: np.ndarray, affine: np.ndarray, n: int = 8) -> list[float]:
    """``n`` axial cuts (world z, mm) spread over the mask's extent, at most one per slice it
    spans (the same cuts for every nilearn figure; nilearn's own choice skips slices)."""
    z = np.unique((np.argwhere(mask) @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3])[:, 2])
    n = max(1, min(n, len(z)))
    return [float(z[i]) for i in np.linspace(0, len(z) - 1, n + 2)[1:-1].round().astype(int)] if len(z) > n \
        else [float(v) for v in z]


def mask_figure(mean_vol, mask, affine, ref) -> str:
    from nilearn import plotting

    plt = pyplot()
    fig = plt.figure(figsize=(11, 2.4))
    # contours need an edge: a mask covering the whole grid is drawn filled
    plotting.plot_roi(nifti(mask.astype(np.uint8), affine), bg_img=nifti(mean_vol, affine), display_mode="z",
                      cut_coords=cuts(mask, affine), view_type="continuous" if mask.all() else "contours",
                      alpha=0.4, cmap="autumn", colorbar=False, draw_cross=False, annotate=True, figure=fig,
                      title=f"mask over the mean of {ref[0]}/{ref[1]}", black_bg=True)
    return figure(png_bytes(fig), f"The mask's outline (red) on axial slices of the mean BOLD image of "
                  f"{ref[0]}/{ref[1]} (the mask's reference run). The store keeps only the voxels inside the mask, "
                  f"so the image is black outside it.", "mask over the mean image",
                  "the outline has the shape of a brain on every slice, with no holes; the mean image inside is "
                  "smooth, brighter in grey matter, with no dark rim (background or skull inside the mask) and no "
                  "stripes; "
                  "dim patches at the bottom slices (signal dropout near the sinuses) are normal.")


def group_tsnr_figure(vol, mask, affine, n) -> str:
    from nilearn import plotting

    plt = pyplot()
    fig = plt.figure(figsize=(11, 2.4))
    vmax = float(np.percentile(vol[vol > 0], 99)) if (vol > 0).any() else 1.0
    plotting.plot_img(nifti(vol, affine), display_mode="z", cut_coords=cuts(mask, affine), cmap="inferno",
                      colorbar=True, vmin=0, vmax=vmax, draw_cross=False, figure=fig, black_bg=True,
                      title=f"median tSNR over {n} (subject, run)s")
    return figure(png_bytes(fig), "Temporal SNR (voxel mean / std over the served TRs, raw units, after any "
                  "cleaning), the median over every (subject, run).", "median tSNR map",
                  "bright, even cortex and a dimmer rim and ventricles; typical 3 T EPI reaches ~30-100 in cortex "
                  "(cleaning -- detrend, high-pass, confounds -- lowers the std, so raises tSNR); a dark region that "
                  "should be brain means signal loss there.")


def _canonical(vol: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return nib.orientations.apply_orientation(vol, nib.orientations.io_orientation(affine))


def montage_figure(view, pairs, vols: dict, mask, affine) -> str:
    """One row per subject, one panel per run: MONTAGE_SLICES axial slices of its tSNR map
    (matplotlib, not nilearn: one nilearn display per panel costs ~0.3 s, 10 s at Sherlock's 34)."""
    plt = pyplot()
    m = _canonical(mask, affine)
    box = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    (x0, x1), (y0, y1), (z0, z1) = [(b[0], b[-1] + 1) for b in box]
    zs = np.unique(np.linspace(z0, z1 - 1, MONTAGE_SLICES + 2)[1:-1].round().astype(int))
    values = np.concatenate([v[v > 0] for v in vols.values()])
    vmax = float(np.percentile(values, 99)) if values.size else 1.0
    subjects = list(dict.fromkeys(s for s, _ in pairs))
    # size the figure from the panels' aspect, so 17 subjects get no blank margins
    col_w, title_h = min(4.5, 12 / len(view.runs)), 0.22
    row_h = col_w * (y1 - y0) / ((x1 - x0) * len(zs)) + title_h
    width, height = col_w * len(view.runs) + 0.9, row_h * len(subjects) + 0.1
    fig, axes = plt.subplots(len(subjects), len(view.runs), squeeze=False, figsize=(width, height))
    fig.subplots_adjust(left=0.01, right=1 - 0.85 / width, bottom=0.05 / height, top=1 - (title_h + 0.05) / height,
                        wspace=0.04, hspace=title_h / (row_h - title_h))
    for i, s in enumerate(subjects):
        for j, r in enumerate(view.runs):
            ax = axes[i, j]
            ax.set_axis_off()
            if (s, r) not in vols:
                ax.text(0.5, 0.5, "no scan", ha="center", va="center", fontsize=8, color="gray")
                continue
            v = _canonical(vols[(s, r)], affine)[x0:x1, y0:y1]
            im = ax.imshow(np.concatenate([v[:, :, z].T for z in zs], axis=1), origin="lower", cmap="inferno",
                           vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{s} {r}", fontsize=7, pad=2)
    if values.size:
        fig.colorbar(im, cax=fig.add_axes((1 - 0.7 / width, 0.1, 0.12 / width, 0.8)), label="tSNR")
    return figure(png_bytes(fig), f"tSNR of every (subject, run) on {MONTAGE_SLICES} axial slices, one colour scale "
                  "(0 to the 99th percentile of all).", "tSNR per subject and run",
                  "every panel looks alike; a subject or run much darker than the others moved more or is noisier, "
                  "a bright or dark band is a slice artefact.")


def std_figure(view, stats: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    live = np.concatenate([s[s > 0] for _, s in stats.values()])
    bins = np.logspace(np.log10(live.min()), np.log10(live.max()), HIST_BINS) if live.size else HIST_BINS
    for (subject, run), (_, std) in stats.items():
        ax.hist(std[std > 0], bins=bins, histtype="step", lw=1, color=f"C{view.runs.index(run) % 10}", alpha=0.7)
    for j, r in enumerate(view.runs):
        ax.plot([], [], color=f"C{j % 10}", label=r)
    ax.set(xscale="log", xlabel="saved std per voxel (raw units, log scale)", ylabel="voxels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure(png_bytes(fig), "The distribution of the saved std (the z-score's denominator) of every "
                  "(subject, run), one line each, coloured by run; zero-variance voxels (std stored as 0) are "
                  "counted in the table above, not drawn.", "histogram of the saved std",
                  "one smooth peak per line, all lines close together; a line shifted far from the others is a "
                  "subject on another intensity scale, a second peak at low std is background inside the mask.")


def carpet_figure(view, pair, cols: np.ndarray, median: float) -> str:
    subject, run = pair
    z = view.array(f"fmri/{subject}/{run}/bold").get_orthogonal_selection((slice(None), cols))
    plt = pyplot()
    fig, (top, ax) = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True, gridspec_kw={"height_ratios": [1, 3]})
    finite = np.isfinite(z)
    count = finite.sum(axis=1)  # censored TRs are rows of NaN: no mean there
    top.plot(np.divide(np.where(finite, z, 0).sum(axis=1), count, out=np.full(len(z), np.nan), where=count > 0),
             lw=0.8, color="k")
    top.set_ylabel("mean z", fontsize=7)
    cmap = plt.get_cmap("gray").with_extremes(bad="red")
    ax.imshow(np.ma.masked_invalid(z.T), aspect="auto", cmap=cmap, vmin=-2.5, vmax=2.5, interpolation="nearest")
    ax.set(xlabel=f"TR ({view.tr_s} s)", ylabel=f"{len(cols)} voxels")
    fig.suptitle(f"{subject} {run}: median tSNR {median:.1f}", fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.14, top=0.9, hspace=0.08)
    return figure(png_bytes(fig), f"Carpet plot of {subject}/{run}: the z-scored BOLD of {len(cols)} sampled voxels "
                  "(rows, in mask order) over every served TR (columns), grey from -2.5 to 2.5; the mean of the "
                  "sampled voxels above; censored TRs in red.", f"carpet plot {subject} {run}",
                  "an even grey texture without structure; vertical stripes (every voxel bright or dark at once, a "
                  "spike in the mean) are head motion or scanner spikes, a slow drift from left to right is "
                  "scanner drift that detrend or high_pass would remove.")


def confound_blocks(view, pairs, censored: dict) -> list[str]:
    rows = []
    for p in pairs:
        meta = pair_meta(view, *p)
        params = (view.manifest["units"].get(f"fmri/{p[0]}/{p[1]}")
                  or view.manifest["units"].get(f"fmri/{p[0]}") or {}).get("params") or {}
        conf = params.get("confounds")
        if conf or meta.get("n_confounds") or censored[p].any():
            rows.append([*p, compact(conf) if conf else None, meta.get("confounds_file"), meta.get("n_confounds"),
                         int(censored[p].sum()), first_trs(censored[p])])
    if not rows:
        return [para("No confounds regressed and no TR censored (fmri.confounds is not set: a BIDS / fMRIPrep "
                     "config sets it).", "muted")]
    return [table(["subject", "run", "confounds", "table", "columns regressed", "censored TRs", "which"], rows),
            censored_figure(view, pairs, censored)]


def first_trs(flags: np.ndarray, n: int = 12) -> Optional[str]:
    idx = np.flatnonzero(flags)
    return None if not idx.size else ", ".join(map(str, idx[:n])) + (" ..." if idx.size > n else "")


def censored_figure(view, pairs, censored: dict) -> str:
    plt = pyplot()
    n = max(len(c) for c in censored.values())
    grid = np.zeros((len(pairs), n))
    for i, p in enumerate(pairs):
        grid[i, :len(censored[p])] = 1 + censored[p]  # 0: no TR there, 1: kept, 2: censored
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(pairs) + 1))
    ax.imshow(grid, aspect="auto", cmap=plt.matplotlib.colors.ListedColormap(["white", "#d5dde5", "#d62728"]),
              vmin=0, vmax=2, interpolation="nearest")
    ax.set_yticks(range(len(pairs)), [f"{s} {r}" for s, r in pairs], fontsize=7)
    ax.set_xlabel("TR")
    fig.tight_layout()
    return figure(png_bytes(fig), "Censored TRs (red) of each (subject, run) over its served TRs (grey).",
                  "censored TRs", "a few scattered red TRs, and the first few of a run (non-steady-state volumes); "
                  "long red stretches or one subject with many are motion worth a look in its carpet plot.")
