"""Small inline SVG charts for the HTML report (no scripts, no external assets)."""

from __future__ import annotations

from html import escape

_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif"'


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def hbar_chart(items: list[tuple[str, float]], unit: str = "", width: int = 760, bar_h: int = 22,
               color: str = "#3b6fd8") -> str:
    """Horizontal bars, one per (label, value), largest scale = longest bar."""
    if not items:
        return ""
    label_w, value_w = 170, 90
    plot_w = width - label_w - value_w
    top = max(v for _, v in items) or 1.0
    h = bar_h * len(items) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
             f'role="img" {_FONT} font-size="12">']
    for i, (label, value) in enumerate(items):
        y = 4 + i * bar_h
        w = max(1.0, plot_w * value / top)
        parts.append(f'<text x="{label_w - 8}" y="{y + bar_h * 0.68:.1f}" text-anchor="end" fill="#333">'
                     f'{escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" rx="3" fill="{color}"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.68:.1f}" fill="#333">'
                     f'{escape(_fmt(value))}{escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(edges: list[float], counts: list[int], width: int = 300, height: int = 96,
              color: str = "#6a8fd8", marker: float | None = None) -> str:
    """Latency histogram; `marker` draws a dashed line (the p95 target) when inside the range."""
    if not counts:
        return '<span class="muted">no durations</span>'
    pad_l, pad_b, pad_t = 6, 18, 6
    plot_w, plot_h = width - 2 * pad_l, height - pad_b - pad_t
    top = max(counts) or 1
    bw = plot_w / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" {_FONT} font-size="10">',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" stroke="#bbb"/>']
    for i, c in enumerate(counts):
        bh = plot_h * c / top
        parts.append(f'<rect x="{pad_l + i * bw + 1:.1f}" y="{pad_t + plot_h - bh:.1f}" width="{max(1.0, bw - 2):.1f}" '
                     f'height="{bh:.1f}" fill="{color}"><title>{edges[i]:.2f}–{edges[i + 1]:.2f} ms: {c}</title></rect>')
    lo, hi = edges[0], edges[-1]
    parts.append(f'<text x="{pad_l}" y="{height - 4}" fill="#555">{_fmt(lo)} ms</text>')
    parts.append(f'<text x="{pad_l + plot_w}" y="{height - 4}" text-anchor="end" fill="#555">{_fmt(hi)} ms</text>')
    if marker is not None and lo < marker < hi:
        x = pad_l + plot_w * (marker - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" y2="{pad_t + plot_h}" stroke="#c62828" '
                     f'stroke-dasharray="3 2"/>')
    parts.append("</svg>")
    return "".join(parts)


def before_after(before: float | None, after: float | None, width: int = 360) -> str:
    """Two bars: estimated cost before and after, on one scale."""
    if before is None:
        return ""
    rows = [("before", before, "#c62828")] + ([("after", after, "#2e7d32")] if after is not None else [])
    label_w, value_w, bar_h = 52, 80, 20
    plot_w = width - label_w - value_w
    top = max(v for _, v, _ in rows) or 1.0
    h = bar_h * len(rows) + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
             f'role="img" {_FONT} font-size="11">']
    for i, (label, value, color) in enumerate(rows):
        y = 2 + i * bar_h
        w = max(1.5, plot_w * value / top)
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" fill="#444">{label}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" rx="2" fill="{color}"/>'
                     f'<text x="{label_w + w + 5:.1f}" y="{y + 14}" fill="#333">{escape(_fmt(value))}</text>')
    parts.append("</svg>")
    return "".join(parts)
