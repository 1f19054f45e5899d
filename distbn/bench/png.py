"""Line charts as PNG without matplotlib: a tiny numpy rasteriser and PNG codec.

What `distbn compare` draws when matplotlib (the `plot` extra) is not installed, so the
study always writes its plot. It draws what the study needs and no more: panels with a
frame, ticks with labels, polylines, square markers, a legend row of colour swatches,
and text in a 5x7 bitmap font (upper case, digits, a little punctuation). PNGs are
8-bit RGB, written with `zlib` and `struct` (filter type 0 on every row).

    fig = Figure(panels=[Panel("LOSS", [Series("local", xs, ys, RED)])], cols=1)
    write_png("plot.png", fig.render())
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["PALETTE", "Series", "Panel", "Figure", "Canvas", "nice_ticks", "format_tick",
           "text_width", "write_png", "read_png"]

#: Line colours (RGB), in the order modes use them.
PALETTE = ((214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14))
_WHITE, _BLACK, _GREY, _LIGHT = (255, 255, 255), (0, 0, 0), (110, 110, 110), (228, 228, 228)
_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 5x7 glyphs (the HD44780 character ROM's shapes): 7 rows of 5 bits, top row first.
# Lower case is drawn as upper case (except "x", a multiplication sign); anything
# unknown as "?".
_GLYPHS = {
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 10001 11111 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    "%": "11000 11001 00010 00100 01000 10011 00011",
    "=": "00000 00000 11111 00000 11111 00000 00000",
    "_": "00000 00000 00000 00000 00000 00000 11111",
    "|": "00100 00100 00100 00100 00100 00100 00100",
    "'": "00100 00100 01000 00000 00000 00000 00000",
    "^": "00100 01010 10001 00000 00000 00000 00000",
    "<": "00010 00100 01000 10000 01000 00100 00010",
    ">": "01000 00100 00010 00001 00010 00100 01000",
    "?": "01110 10001 00001 00010 00100 00000 00100",
    "*": "00000 00100 10101 01110 10101 00100 00000",
    "x": "00000 00000 10001 01010 00100 01010 10001",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}
_FONT_W, _FONT_H = 5, 7


def _glyph_bitmap(rows: str) -> np.ndarray:
    bits = [[c == "1" for c in row] for row in rows.split()]
    if len(bits) != _FONT_H or any(len(r) != _FONT_W for r in bits):
        raise ValueError(f"a glyph needs {_FONT_H} rows of {_FONT_W} bits, got {rows!r}")
    return np.array(bits, dtype=bool)


_BITMAPS = {ch: _glyph_bitmap(rows) for ch, rows in _GLYPHS.items()}


def _bitmap(ch: str) -> np.ndarray:
    return _BITMAPS.get(ch) if ch in _BITMAPS else _BITMAPS.get(ch.upper(), _BITMAPS["?"])


# --------------------------------------------------------------------------------------
# PNG codec


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png(path, rgb) -> Path:
    """Write an RGB image as an 8-bit PNG.

    Args:
        path: the file to write.
        rgb: (height, width, 3) uint8 array (other integer/float arrays are clipped to
            0..255).

    Returns:
        The path written.
    """
    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"write_png: expected a (height, width, 3) array, got shape {img.shape}")
    img = np.clip(img, 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
    h, w, _ = img.shape
    # Filter byte 0 (None) before each row: simple, and zlib still shrinks flat plots well.
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1)
    data = (_SIGNATURE
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + _chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(data)
    return path


def read_png(path) -> np.ndarray:
    """Read an 8-bit RGB, non-interlaced PNG whose rows use filter 0 (what `write_png`
    writes), checking every chunk's CRC.

    Args:
        path: the file.

    Returns:
        The (height, width, 3) uint8 image. Raises ValueError for anything else.
    """
    data = Path(path).read_bytes()
    if data[:8] != _SIGNATURE:
        raise ValueError(f"{path}: not a PNG (signature {data[:8]!r})")
    pos, header, idat, ended = 8, None, b"", False
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            ended = True
            break
        pos += 12 + length
    if header is None or not ended:
        raise ValueError(f"{path}: missing IHDR or IEND chunk")
    w, h, depth, colour, _, _, interlace = header
    if (depth, colour, interlace) != (8, 2, 0):
        raise ValueError(f"{path}: only 8-bit RGB non-interlaced PNGs are read, got bit depth "
                         f"{depth}, colour type {colour}, interlace {interlace}")
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    if np.any(raw[:, 0] != 0):
        raise ValueError(f"{path}: rows use PNG filters other than 0")
    return raw[:, 1:].reshape(h, w, 3).copy()


# --------------------------------------------------------------------------------------
# Drawing


class Canvas:
    """An RGB pixel buffer with the few drawing operations the charts need.

    Args:
        width, height: size in pixels.
        background: RGB fill.
    """

    def __init__(self, width: int, height: int, background=_WHITE):
        self.width, self.height = int(width), int(height)
        self.pixels = np.empty((self.height, self.width, 3), dtype=np.uint8)
        self.pixels[:] = background

    def rect(self, x0, y0, x1, y1, colour, fill=False) -> None:
        """A rectangle from (x0, y0) to (x1, y1) inclusive (clipped to the canvas).

        Args:
            x0, y0, x1, y1: corners in pixels (any order).
            colour: RGB.
            fill: fill it rather than draw its outline.
        """
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        xa, xb = max(x0, 0), min(x1, self.width - 1)
        ya, yb = max(y0, 0), min(y1, self.height - 1)
        if xa > xb or ya > yb:
            return
        if fill:
            self.pixels[ya:yb + 1, xa:xb + 1] = colour
            return
        for y in {y0, y1}:
            if 0 <= y < self.height:
                self.pixels[y, xa:xb + 1] = colour
        for x in {x0, x1}:
            if 0 <= x < self.width:
                self.pixels[ya:yb + 1, x] = colour

    def polyline(self, xs, ys, colour, width=2, clip=None) -> None:
        """Connect the points in order; non-finite points break the line.

        Args:
            xs, ys: pixel coordinates (floats).
            colour: RGB.
            width: line thickness in pixels.
            clip: (x0, y0, x1, y1) box outside which nothing is drawn (default: canvas).
        """
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if xs.size == 1:
            self.markers(xs, ys, colour, size=width + 1, clip=clip)
            return
        ok = np.isfinite(xs) & np.isfinite(ys)
        seg = ok[:-1] & ok[1:]
        x0, y0, x1, y1 = xs[:-1][seg], ys[:-1][seg], xs[1:][seg], ys[1:][seg]
        if not x0.size:
            return
        # Sample every segment at half-pixel spacing: all segments at once, no Python loop.
        steps = np.ceil(2 * np.maximum(np.abs(x1 - x0), np.abs(y1 - y0))).astype(np.int64) + 1
        which = np.repeat(np.arange(x0.size), steps)
        first = np.cumsum(steps) - steps
        t = (np.arange(which.size) - first[which]) / np.maximum(steps[which] - 1, 1)
        px = x0[which] + t * (x1 - x0)[which]
        py = y0[which] + t * (y1 - y0)[which]
        self._stamp(px, py, colour, width, clip)

    def markers(self, xs, ys, colour, size=5, clip=None) -> None:
        """Filled squares centred on the points (non-finite points are skipped).

        Args:
            xs, ys: pixel coordinates.
            colour: RGB.
            size: the squares' side in pixels.
            clip: (x0, y0, x1, y1) box outside which nothing is drawn (default: canvas).
        """
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        ok = np.isfinite(xs) & np.isfinite(ys)
        self._stamp(xs[ok], ys[ok], colour, size, clip)

    def _stamp(self, px, py, colour, size, clip) -> None:
        x0, y0, x1, y1 = clip if clip is not None else (0, 0, self.width - 1, self.height - 1)
        offsets = np.arange(size) - (size - 1) // 2
        ix = (np.round(px)[:, None] + offsets[None, :]).astype(np.int64)
        iy = (np.round(py)[:, None] + offsets[None, :]).astype(np.int64)
        gx = np.repeat(ix, size, axis=1).ravel()
        gy = np.tile(iy, (1, size)).ravel()
        keep = (gx >= max(x0, 0)) & (gx <= min(x1, self.width - 1)) \
            & (gy >= max(y0, 0)) & (gy <= min(y1, self.height - 1))
        self.pixels[gy[keep], gx[keep]] = colour

    def text(self, x, y, s: str, colour=_BLACK, scale=1, anchor="left") -> int:
        """Draw `s` in the 5x7 font with its top at `y`.

        Args:
            x: left edge ("left"), centre ("centre") or right edge ("right").
            y: top edge.
            s: the text (lower case is drawn as upper case).
            colour: RGB.
            scale: pixels per font pixel.
            anchor: how `x` is read.

        Returns:
            The text's width in pixels.
        """
        width = text_width(s, scale)
        if anchor == "centre":
            x -= width // 2
        elif anchor == "right":
            x -= width
        x, y = int(round(x)), int(round(y))
        for i, ch in enumerate(s):
            bm = _bitmap(ch)
            if scale != 1:
                bm = np.kron(bm, np.ones((scale, scale), dtype=bool))
            gx = x + i * (_FONT_W + 1) * scale
            ys, xs = np.nonzero(bm)
            xs, ys = xs + gx, ys + y
            keep = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
            self.pixels[ys[keep], xs[keep]] = colour
        return width


def text_width(s: str, scale=1) -> int:
    """Width in pixels of `s` in the 5x7 font (one blank column between glyphs)."""
    return max(len(s) * (_FONT_W + 1) - 1, 0) * scale


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About `target` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi].

    Args:
        lo, hi: the data range (lo may equal hi).
        target: the number of intervals wanted.

    Returns:
        Increasing tick values from <= lo to >= hi.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks: the range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    n = int(round((stop - start) / step))
    return [start + i * step for i in range(n + 1)]


def format_tick(v: float, step: float) -> str:
    """A tick label with as many decimals as the tick spacing needs.

    Args:
        v: the tick value.
        step: the spacing between ticks.

    Returns:
        e.g. "0.25", "1500", "1E-4" (very large or small values in E notation).
    """
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e").replace(".0e", "e").upper()
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 3
    text = f"{v:.{decimals}f}"
    if abs(float(text) - v) > 1e-9 * max(abs(v), 1):  # e.g. 2.5 steps need one more digit
        text = f"{v:.{decimals + 1}f}"
    return text


@dataclasses.dataclass
class Series:
    """One line of a panel.

    Attributes:
        label: the legend text.
        x, y: the points (non-finite y values break the line).
        colour: RGB.
        markers: draw squares at the points instead of (or as well as: `line=True`) a line.
        line: draw the connecting line.
        width: line thickness in pixels.
    """

    label: str
    x: list
    y: list
    colour: tuple
    markers: bool = False
    line: bool = True
    width: int = 2


@dataclasses.dataclass
class Panel:
    """One chart: title, axis labels and its series.

    Attributes:
        title: drawn above the frame.
        series: the `Series` to draw.
        xlabel, ylabel: axis titles (the y label is drawn above the axis, horizontally).
        ylim: fixed (low, high), or None to fit the data.
    """

    title: str
    series: list
    xlabel: str = "step"
    ylabel: str = ""
    ylim: tuple | None = None


class Figure:
    """Panels on a grid, with a legend row (colour swatches and labels) on top.

    Args:
        panels: the `Panel`s, filled row by row.
        cols: panels per row.
        panel_size: (width, height) of each panel in pixels.
        title: a line above the legend ("" for none).
        legend: [(label, colour)]; default: every series label, in first-seen order.
    """

    def __init__(self, panels, cols=2, panel_size=(460, 300), title="", legend=None):
        self.panels = list(panels)
        self.cols = max(1, int(cols))
        self.panel_size = tuple(int(v) for v in panel_size)
        self.title = title
        if legend is None:
            seen: dict = {}
            for p in self.panels:
                for s in p.series:
                    seen.setdefault(s.label, s.colour)
            legend = list(seen.items())
        self.legend = list(legend)

    def render(self) -> np.ndarray:
        """Draw everything.

        Returns:
            The (height, width, 3) uint8 image.
        """
        pw, ph = self.panel_size
        rows = max(1, math.ceil(len(self.panels) / self.cols))
        top = 12 + (22 if self.title else 0) + 18
        canvas = Canvas(self.cols * pw + 10, top + rows * ph + 6)
        y = 8
        if self.title:
            canvas.text(canvas.width // 2, y, self.title, scale=2, anchor="centre")
            y += 22
        self._legend(canvas, y)
        for i, panel in enumerate(self.panels):
            r, c = divmod(i, self.cols)
            _draw_panel(canvas, panel, 5 + c * pw, top + r * ph, pw, ph)
        return canvas.pixels

    def _legend(self, canvas, y) -> None:
        widths = [14 + 6 + text_width(label) + 18 for label, _ in self.legend]
        x = max((canvas.width - sum(widths)) // 2, 4)
        for (label, colour), w in zip(self.legend, widths, strict=True):
            canvas.rect(x, y, x + 13, y + 8, colour, fill=True)
            canvas.text(x + 20, y + 1, label)
            x += w


def _draw_panel(canvas, panel, x, y, w, h) -> None:
    """One chart in the box (x, y, w, h): title, frame, grid, ticks, series."""
    left, right, top, bottom = x + 62, x + w - 14, y + 28, y + h - 34
    canvas.text((left + right) // 2, y + 6, panel.title, anchor="centre")
    if panel.ylabel:
        canvas.text(left, y + 17, panel.ylabel, colour=_GREY)
    xs_all = [v for s in panel.series for v in s.x if v is not None and math.isfinite(v)]
    ys_all = [v for s in panel.series for v in s.y if v is not None and math.isfinite(v)]
    canvas.rect(left, top, right, bottom, _BLACK)
    if not xs_all or not ys_all:
        canvas.text((left + right) // 2, (top + bottom) // 2 - 3, "NO DATA", colour=_GREY,
                    anchor="centre")
        return
    xlo, xhi = min(xs_all), max(xs_all)
    if xlo == xhi:
        xlo, xhi = xlo - 1, xhi + 1
    if panel.ylim is not None:
        ylo, yhi = panel.ylim
    else:
        ylo, yhi = min(ys_all), max(ys_all)
    yt = nice_ticks(ylo, yhi)
    ylo, yhi = yt[0], yt[-1]
    xt = [v for v in nice_ticks(xlo, xhi, 5) if xlo - 1e-9 <= v <= xhi + 1e-9]

    def px(v):
        return left + (np.asarray(v, dtype=np.float64) - xlo) / (xhi - xlo) * (right - left)

    def py(v):
        return bottom - (np.asarray(v, dtype=np.float64) - ylo) / (yhi - ylo) * (bottom - top)

    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for v in yt:
        yy = int(round(float(py(v))))
        if top < yy < bottom:
            canvas.rect(left + 1, yy, right - 1, yy, _LIGHT)
        canvas.rect(left - 4, yy, left, yy, _BLACK)
        canvas.text(left - 7, yy - 3, format_tick(v, ystep), anchor="right")
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    for v in xt:
        xx = int(round(float(px(v))))
        canvas.rect(xx, bottom, xx, bottom + 4, _BLACK)
        canvas.text(xx, bottom + 8, format_tick(v, xstep), anchor="centre")
    if panel.xlabel:
        canvas.text((left + right) // 2, bottom + 20, panel.xlabel, colour=_GREY,
                    anchor="centre")
    # Lines may cover the frame: a series at the bottom of the range (a spread of exactly
    # 0) must stay visible.
    clip = (left, top, right, bottom)
    for s in panel.series:
        xv = np.array([np.nan if v is None else v for v in s.x], dtype=np.float64)
        yv = np.array([np.nan if v is None else v for v in s.y], dtype=np.float64)
        if s.line and xv.size:
            canvas.polyline(px(xv), py(yv), s.colour, width=s.width, clip=clip)
        if s.markers and xv.size:
            canvas.markers(px(xv), py(yv), s.colour, size=5, clip=clip)
