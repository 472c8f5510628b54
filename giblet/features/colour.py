"""Colour: how a movie's YUV pixels become RGB, decided from the stream's own colour flags.

Rule: a flagged matrix or range is used as flagged; an unflagged matrix is BT.601 at every
frame size and an unflagged range is limited (full for the JPEG ``yuvj*`` pixel formats). The
output is full-range RGB (0-255); primaries and transfer are not converted (the stored pixels
are the movie's own R'G'B' code values, as every decoder shows them).

Why BT.601 for unflagged HD too (players such as mpv guess BT.709 above 576 lines): FFmpeg's
swscale uses BT.601 for an unflagged movie both ways -- to decode it (so OpenCV, PyAV and the
ffmpeg CLI show it so) and to write one from RGB (OpenCV ``VideoWriter``, PyAV, ``ffmpeg -i
%d.png``, ``giblet.synth``) -- while HD masters that are BT.709 normally carry the flag. A
BT.709 movie that lost its flags can be re-flagged without re-encoding, e.g. ``ffmpeg -i in.mp4
-c copy -bsf:v h264_metadata=matrix_coefficients=1 out.mp4`` (``hevc_metadata`` for HEVC).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from giblet.errors import InputError

# AVColorSpace codes (libavutil/pixfmt.h) of the YUV matrices swscale inverts -> our name; BT.470BG
# (5) and SMPTE 170M (6) are both the BT.601 matrix (they differ in primaries, which are not converted)
MATRICES = {1: "bt709", 4: "fcc", 5: "bt601", 6: "bt601", 7: "smpte240m", 9: "bt2020"}
SWS_COLORSPACES = {"bt709": "ITU709", "fcc": "FCC", "bt601": "ITU601", "smpte240m": "SMPTE240M", "bt2020": "BT2020"}
UNFLAGGED_MATRICES = (2, 3)  # AVCOL_SPC_UNSPECIFIED, AVCOL_SPC_RESERVED
UNFLAGGED_MATRIX = "bt601"  # swscale's (so FFmpeg's, OpenCV's, PyAV's) reading of an unflagged movie
RANGES = {1: "limited", 2: "full"}  # AVColorRange MPEG (Y 16-235), JPEG (0-255); 0 is unflagged
FLAGS, DEFAULT = "stream flags", "default (unflagged)"


@dataclass(frozen=True)
class Colour:
    """How a movie's YUV pixels become full-range RGB, and where each choice came from."""

    matrix: str  # "bt601", "bt709", "fcc", "smpte240m", "bt2020"; "none" when the movie stores RGB
    range: str  # "limited" (Y 16-235, chroma 16-240) or "full" (0-255)
    matrix_source: str  # FLAGS, DEFAULT or "RGB pixel format"
    range_source: str  # FLAGS, DEFAULT, "RGB pixel format" or "pixel format (yuvj)"

    def attrs(self) -> dict:
        return {"matrix": self.matrix, "range": self.range, "matrix_source": self.matrix_source,
                "range_source": self.range_source, "output": "full-range RGB (0-255), chroma interpolated "
                "to every pixel; primaries and transfer are not converted"}

    def reformat_args(self) -> dict:
        """Keyword arguments of ``VideoReformatter.reformat`` that apply this conversion."""
        if self.matrix == "none":
            return {}
        cs = SWS_COLORSPACES[self.matrix]
        return {"src_colorspace": cs, "dst_colorspace": cs, "dst_color_range": "JPEG",
                "src_color_range": "MPEG" if self.range == "limited" else "JPEG"}


def colour_of(colorspace: int, color_range: int, pix_fmt, where: str) -> Colour:
    """The YUV -> RGB conversion that a stream's (or frame's) own colour flags call for.

    A flagged matrix or range is used as flagged; an unflagged matrix is BT.601 at every
    frame size, an unflagged range limited (full for ``yuvj*`` formats); see the module doc.

    Args:
        colorspace: ``AVColorSpace`` code (``frame.colorspace``, ``codec_context.colorspace``).
        color_range: ``AVColorRange`` code (0 unflagged, 1 limited, 2 full).
        pix_fmt: the ``av.VideoFormat`` of the pixels, or None if unknown.
        where: the movie, for the error message.

    Raises:
        InputError: the stream flags a matrix swscale cannot invert (e.g. YCgCo, ICtCp).
    """
    if pix_fmt is not None and pix_fmt.is_rgb:
        return Colour("none", "full", "RGB pixel format", "RGB pixel format")
    if colorspace in MATRICES:
        matrix, matrix_source = MATRICES[colorspace], FLAGS
    elif colorspace in UNFLAGGED_MATRICES:
        matrix, matrix_source = UNFLAGGED_MATRIX, DEFAULT
    else:
        raise InputError(f"video: {where} flags YUV matrix AVColorSpace {colorspace} (libavutil/pixfmt.h), which "
                         f"swscale cannot convert to RGB (it can: {', '.join(sorted(SWS_COLORSPACES))}); convert "
                         f"it, e.g. `ffmpeg -i {Path(where).name} -vf colorspace=all=bt709 -c:a copy fixed.mp4`")
    if color_range in RANGES:
        return Colour(matrix, RANGES[color_range], matrix_source, FLAGS)
    if pix_fmt is not None and pix_fmt.name.startswith("yuvj"):
        return Colour(matrix, "full", matrix_source, "pixel format (yuvj)")
    return Colour(matrix, "limited", matrix_source, DEFAULT)
