"""Server-rendered SVG bar charts (no JavaScript, no Node build); colours come from CSS classes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe


def _nice_max(value: int) -> int:
    if value <= 5:
        return 5
    magnitude = 10 ** (len(str(value)) - 1)
    for factor in (1, 2, 2.5, 5, 10):
        top = int(factor * magnitude)
        if top >= value:
            return top
    return value


def stacked_bars(
    series: Sequence[dict[str, Any]],
    *,
    title: str,
    label: Callable[[dt.datetime], str],
    width: int = 720,
    height: int = 180,
    tick_every: int = 10,
) -> SafeString:
    """Succeeded (bottom) and failed (top) per bucket; each bar has a <title> tooltip."""
    left, bottom, top_pad = 40, 22, 8
    plot_w, plot_h = width - left - 4, height - bottom - top_pad
    top = _nice_max(max((b["succeeded"] + b["failed"] for b in series), default=0))
    slot = plot_w / max(1, len(series))
    bar = max(1.0, slot * 0.8)
    parts = [
        f'<svg class="sl-chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
        f'preserveAspectRatio="none" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
    ]
    for fraction in (0, 0.5, 1):
        y = top_pad + plot_h * (1 - fraction)
        parts.append(f'<line class="sl-grid" x1="{left}" x2="{width - 4}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="sl-axis" x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{top * fraction:g}</text>')
    for index, bucket in enumerate(series):
        x = left + index * slot + (slot - bar) / 2
        ok_h = plot_h * bucket["succeeded"] / top
        fail_h = plot_h * bucket["failed"] / top
        base = top_pad + plot_h
        tip = escape(f"{label(bucket['start'])}: {bucket['succeeded']} succeeded, {bucket['failed']} failed")
        parts.append(f'<g><title>{tip}</title>')
        parts.append(f'<rect class="sl-bar-bg" x="{left + index * slot:.1f}" y="{top_pad}" width="{slot:.1f}" height="{plot_h}"/>')
        if ok_h:
            parts.append(f'<rect class="sl-ok" x="{x:.1f}" y="{base - ok_h:.1f}" width="{bar:.1f}" height="{ok_h:.1f}"/>')
        if fail_h:
            parts.append(f'<rect class="sl-fail" x="{x:.1f}" y="{base - ok_h - fail_h:.1f}" width="{bar:.1f}" height="{fail_h:.1f}"/>')
        parts.append("</g>")
        if index % tick_every == 0 or index == len(series) - 1:
            parts.append(f'<text class="sl-axis" x="{x + bar / 2:.1f}" y="{height - 6}" text-anchor="middle">{escape(label(bucket["start"]))}</text>')
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every interpolated text is escaped above
