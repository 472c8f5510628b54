"""The stimuli section: a contact sheet of stored frames, audio code usage, annotation coverage.

Bounded reads: one frame slot at each of ``SHEET_TRS`` TRs per run (a chunk decoded each), the
codes of at most ``AUDIO_TRS`` evenly spaced TRs, and the ``(tr,)`` ``has_text`` flags.
"""
from __future__ import annotations

import numpy as np

from giblet.reader import StoreView
from giblet.report.fmri import pyplot
from giblet.report.page import Section, figure, heading, para, png_bytes, table

SHEET_TRS = 12
SHEET_COLS = 6
AUDIO_TRS = 256


def evenly(n: int, k: int) -> np.ndarray:
    """At most ``k`` distinct TRs spread evenly over ``[0, n)``."""
    return np.unique(np.linspace(0, max(n - 1, 0), num=min(k, n)).round().astype(int))


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def stimuli_section(view: StoreView) -> Section:
    sec = Section("stimuli", "Stimuli")
    runs = {m: view.modality_runs(m) for m in ("video", "audio", "text")}
    if not any(runs.values()):
        return sec.add(para("This store has no stimulus (fMRI only).", "muted"))
    if runs["video"]:
        sec.add(heading("Video: contact sheets"), *(contact_sheet(view, r) for r in runs["video"]))
    if runs["audio"]:
        sec.add(heading("Audio: code usage"), *audio_blocks(view, runs["audio"]))
    if runs["text"]:
        sec.add(heading("Annotations: coverage"), *text_blocks(view, runs["text"]))
    missing = [m for m, r in runs.items() if not r]
    if missing:
        sec.add(para(f"Not in this store: {', '.join(missing)}.", "muted"))
    return sec


def onset(view: StoreView, run: str) -> float:
    return float(view.align["runs"][run].get("onset_s") or 0.0)


def contact_sheet(view: StoreView, run: str) -> str:
    arr = view.array(view.stimulus_name("video", run))
    trs = evenly(view.n_trs(run), SHEET_TRS)
    frames = [arr[int(t), 0] for t in trs]  # the first slot: the frame on screen as the TR starts
    h, w = frames[0].shape[:2]
    rows, pad = -(-len(trs) // SHEET_COLS), max(2, w // 40)
    # one mosaic in one axes: a grid of axes with titles costs seconds of layout
    sheet = np.full((rows * (h + pad) + pad, SHEET_COLS * (w + pad) + pad, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, SHEET_COLS)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = frame
    plt = pyplot()
    width = 11.0
    fig = plt.figure(figsize=(width, width * sheet.shape[0] / sheet.shape[1] + 0.3))
    ax = fig.add_axes((0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    ax.imshow(sheet, interpolation="nearest")
    ax.set_axis_off()
    for i, t in enumerate(trs):
        r, c = divmod(i, SHEET_COLS)
        label = f"TR {t} · {clock(onset(view, run) + t * view.tr_s)}"
        ax.text(pad + c * (w + pad) + 2, pad + r * (h + pad) + 2, label, fontsize=7, color="white", va="top",
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "lw": 0})
    fig.suptitle(f"{run}: {len(trs)} of {view.n_trs(run)} TRs", fontsize=9, y=0.995, va="top")
    shown = ", ".join(f"TR {t} · {clock(onset(view, run) + t * view.tr_s)}" for t in trs)
    return figure(png_bytes(fig), f"{run}: the stored frame at the start of {len(trs)} evenly spaced TRs, with the "
                  f"TR's start on the stimulus clock (minutes:seconds from the movie's first frame): {shown}.",
                  f"contact sheet {run}",
                  "the movie's scenes in order, at the times a player shows them; natural colours (a green or purple "
                  "cast is a wrong colour matrix), the right aspect ratio, no black or frozen frames except where the "
                  "movie has them.")


def code_usage(codes: np.ndarray, size: int) -> np.ndarray:
    """``(tr, codebook, code_frame)`` codes -> ``(codebook, size)`` counts of each code."""
    return np.stack([np.bincount(codes[:, k].ravel(), minlength=size)[:size] for k in range(codes.shape[1])])


def audio_blocks(view: StoreView, runs: list[str]) -> list[str]:
    plt = pyplot()
    out, rows = [], []
    fig, axes = plt.subplots(1, len(runs), squeeze=False, figsize=(min(12, 4.5 * len(runs)), 3.2))
    for ax, run in zip(axes[0], runs):
        arr = view.array(view.stimulus_name("audio", run))
        trs = evenly(view.n_trs(run), AUDIO_TRS)
        codes = arr.get_orthogonal_selection((trs, slice(None), slice(None))).astype(np.int64)
        size = int(arr.attrs.get("codebook_size") or codes.max() + 1)
        counts = code_usage(codes, size)
        for k, c in enumerate(counts):
            p = c[c > 0] / c.sum()
            rows.append([run, k, len(trs), int((c > 0).sum()), size, round(float(np.exp(-(p * np.log(p)).sum())), 1),
                         round(float(c.max() / c.sum()), 3)])
            ax.plot(np.arange(1, size + 1), np.sort(c)[::-1] / c.sum(), lw=1, label=f"codebook {k}")
        ax.set(xscale="log", yscale="log", xlabel="code rank", ylabel="share of code frames", title=run)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(figure(png_bytes(fig), f"How often each EnCodec code is used, per codebook, over at most {AUDIO_TRS} "
                      "evenly spaced TRs of each run: codes sorted from most to least used.", "audio code usage",
                      "each codebook uses hundreds of its codes with a smooth fall-off; a curve that drops to nothing "
                      "after a few codes, or one code taking most frames, is silence, a broken track or a wrong "
                      "model (a random-weight model, as in the demo, gives flatter curves than a trained one)."))
    out.append(table(["run", "codebook", "TRs sampled", "codes used", "codebook size", "perplexity",
                      "top code share"], rows))
    return out


def text_blocks(view: StoreView, runs: list[str]) -> list[str]:
    plt = pyplot()
    has = {r: np.asarray(view.has_text(r), bool) for r in runs}
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(runs) + 1))
    for i, r in enumerate(runs):
        t0 = onset(view, r)
        spans = [(t0 + t * view.tr_s, view.tr_s) for t in np.flatnonzero(has[r])]
        ax.broken_barh([(t0, len(has[r]) * view.tr_s)], (i - 0.4, 0.8), color="#e3e8ee")
        ax.broken_barh(spans, (i - 0.4, 0.8), color="#2a9d8f")
    ax.set_yticks(range(len(runs)), runs, fontsize=8)
    ax.set(xlabel="stimulus time (s)", ylim=(-0.6, len(runs) - 0.4))
    ax.invert_yaxis()
    fig.tight_layout()
    rows = [[r, len(has[r]), int(has[r].sum()), round(100 * float(has[r].mean()), 1) if len(has[r]) else None,
             view.unit_meta(f"text/{r}").get("n_used_rows")] for r in runs]
    return [figure(png_bytes(fig), "Which TRs an annotation covers (green) on each run's TR grid (grey).",
                   "annotation coverage",
                   "green from start to end with few gaps; gaps are stretches no annotation row covers (credits, "
                   "pauses), a run that is mostly grey lost its rows (the sheet's run split or time unit is wrong)."),
            table(["run", "TRs", "TRs with text", "% covered", "annotation rows used"], rows)]
