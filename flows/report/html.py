"""The report's ``index.html``: the summary tables and the PNG plots, one self-contained page."""

from __future__ import annotations

import html
from collections.abc import Mapping
from datetime import UTC, datetime

from flows.report.summary import STAGE_NAMES, EngineSummary

__all__ = ["render_index"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.total td { font-weight: 600; background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 13px; }
"""


def render_index(
    summary: EngineSummary,
    plots: Mapping[str, str],
    *,
    root: str,
    title: str = "sam-data-engine report",
) -> str:
    """The page as a string.

    Args:
        summary: the numbers (read back from the store and the registry).
        plots: caption -> PNG file name relative to the page.
        root: the storage root the numbers were read from (shown, not linked).
        title: the page title.
    """
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Storage root <code>{html.escape(root)}</code>; generated '
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}. Every number is read from the mask store "
        "and the model registry.</p>",
        _headline(summary),
        "<h2>Stages and rounds</h2>",
        _rounds_table(summary),
        "<h2>Model versions on the holdout</h2>",
        _versions_table(summary),
    ]
    for caption, name in plots.items():
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(f'<img src="{html.escape(name)}" alt="{html.escape(caption)}">')
    parts.append(
        '<p class="note">Clicks and seconds are the annotators\' (simulated or Label Studio '
        "lead times); automatic masks count as zero. NoC@90 is the number of clicks to reach "
        "IoU 0.90, capped at the evaluation's click budget.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _headline(summary: EngineSummary) -> str:
    first, final = summary.first_version, summary.final_version
    items = [f"<li>{summary.total_masks} masks in all</li>"]
    for stage in summary.stages:
        items.append(
            f"<li>stage {stage.stage} ({STAGE_NAMES.get(stage.stage, '')}): "
            f"{stage.masks_per_image:.1f} masks per image, {stage.clicks_per_mask:.2f} clicks "
            f"and {stage.seconds_per_mask:.1f} s per mask</li>"
        )
    if first is not None and final is not None:
        items.append(
            f"<li>holdout mIoU@1 {_f(first.miou_1click, 3)} &rarr; {_f(final.miou_1click, 3)}, "
            f"NoC@90 {_f(first.noc90, 2)} &rarr; {_f(final.noc90, 2)} "
            f"({html.escape(first.version)} &rarr; {html.escape(final.version)})</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def _rounds_table(summary: EngineSummary) -> str:
    head = (
        "<tr><th class='l'>stage</th><th>round</th><th>images</th><th>masks</th>"
        "<th>masks/image</th><th>manual</th><th>kept from model</th><th>auto</th>"
        "<th>clicks/mask</th><th>s/mask</th><th>s/new mask</th><th class='l'>assisted by</th>"
        "<th class='l'>trained</th></tr>"
    )
    rows = [head]
    for stage in summary.stages:
        for r in stage.rounds:
            rows.append(
                f"<tr><td class='l'>{r.stage} {STAGE_NAMES.get(r.stage, '')}</td><td>{r.round}</td>"
                f"<td>{r.images}</td><td>{r.masks}</td><td>{r.masks_per_image:.1f}</td>"
                f"<td>{r.manual}</td><td>{r.model}</td><td>{r.auto}</td>"
                f"<td>{r.clicks_per_mask:.2f}</td><td>{r.seconds_per_mask:.1f}</td>"
                f"<td>{_f(r.seconds_per_new_mask, 1)}</td>"
                f"<td class='l'>{html.escape(r.assisted_by or '-')}</td>"
                f"<td class='l'>{html.escape(r.trained_version or '-')}</td></tr>"
            )
        rows.append(
            f"<tr class='total'><td class='l'>stage {stage.stage}</td><td>all</td>"
            f"<td>{stage.images}</td><td>{stage.masks}</td><td>{stage.masks_per_image:.1f}</td>"
            f"<td colspan='3'></td><td>{stage.clicks_per_mask:.2f}</td>"
            f"<td>{stage.seconds_per_mask:.1f}</td><td colspan='3'></td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _versions_table(summary: EngineSummary) -> str:
    rows = [
        "<tr><th class='l'>version</th><th class='l'>parent</th><th>stage</th><th>round</th>"
        "<th>mIoU@1</th><th>mIoU@5</th><th>NoC@85</th><th>NoC@90</th><th>promoted</th></tr>"
    ]
    for v in summary.versions:
        rows.append(
            f"<tr><td class='l'>{html.escape(v.version)}</td>"
            f"<td class='l'>{html.escape(v.parent or '-')}</td>"
            f"<td>{_o(v.stage)}</td><td>{_o(v.round)}</td><td>{_f(v.miou_1click, 3)}</td>"
            f"<td>{_f(v.miou_5click, 3)}</td><td>{_f(v.noc85, 2)}</td><td>{_f(v.noc90, 2)}</td>"
            f"<td>{_o(v.promoted)}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _o(value: object) -> str:
    return "-" if value is None else html.escape(str(value))
