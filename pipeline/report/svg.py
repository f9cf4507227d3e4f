"""Inline SVG written as text: the few elements the charts draw, with tooltips as ``<title>``.

Every label and tooltip goes through :func:`escape`; coordinates keep one decimal at most,
which is all a screen shows and keeps the page small.
"""

from __future__ import annotations

from pipeline.report.formatting import escape


def coord(x: float) -> str:
    """An SVG coordinate: at most one decimal, none for whole numbers."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


class Svg:
    """One chart's ``<svg>`` element, built up part by part; :meth:`done` closes it."""

    def __init__(self, ident: str, width: float, height: float, title: str) -> None:
        self.parts = [f'<svg id="{ident}" class="chart" viewBox="0 0 {coord(width)} '
                      f'{coord(height)}" width="{coord(width)}" height="{coord(height)}" '
                      f'role="img" aria-labelledby="{ident}-title">',
                      f'<title id="{ident}-title">{escape(title)}</title>']

    def add(self, part: str) -> None:
        self.parts.append(part)

    def text(self, x: float, y: float, label: str, cls: str = "", anchor: str = "start",
             extra: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        a = f' text-anchor="{anchor}"' if anchor != "start" else ""
        self.parts.append(f'<text x="{coord(x)}" y="{coord(y)}"{c}{a}{extra}>{escape(label)}'
                          "</text>")

    def line(self, x1: float, y1: float, x2: float, y2: float, cls: str) -> None:
        self.parts.append(f'<line x1="{coord(x1)}" y1="{coord(y1)}" x2="{coord(x2)}" '
                          f'y2="{coord(y2)}" class="{cls}"/>')

    def rect(self, x: float, y: float, w: float, h: float, fill: str = "",
             tip: str = "", cls: str = "") -> None:
        f = f' fill="{fill}"' if fill else ""
        c = f' class="{cls}"' if cls else ""
        end = f"><title>{escape(tip)}</title></rect>" if tip else "/>"
        self.parts.append(f'<rect x="{coord(x)}" y="{coord(y)}" width="{coord(max(w, 0))}" '
                          f'height="{coord(max(h, 0))}"{f}{c}{end}')

    def done(self) -> str:
        return "\n".join([*self.parts, "</svg>"])


def empty_chart(ident: str, title: str, width: float, height: float, message: str) -> str:
    """A dashed frame with ``message``, where a chart has nothing to show."""
    svg = Svg(ident, width, height, title)
    svg.rect(0.5, 0.5, width - 1, height - 1, cls="empty-frame")
    svg.text(width / 2, height / 2 + 4, message, "empty", "middle")
    return svg.done()
