"""The self-contained HTML report: one file, figures inlined as base64 PNG, every user string escaped (autoescape)."""
from __future__ import annotations

import base64
import datetime as _dt
from pathlib import Path
from typing import Optional, Sequence

from robustness_diag.io import atomic_write_text

from .figures import Figure

TEMPLATES = Path(__file__).parent / "templates"


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = format_number
    return env


def format_number(v, digits: int = 3) -> str:
    """Numbers for tables: None -> 'undefined', floats to ``digits`` significant decimals, ints as they are."""
    if v is None:
        return "undefined"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "NaN"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def metric_text(m: Optional[dict]) -> str:
    """``value [ci_low, ci_high]`` or ``undefined (reason)`` for a metric dict of :mod:`analyses.stats`."""
    if not m:
        return "n/a"
    if m.get("value") is None:
        return f"undefined ({m.get('undefined', 'no data')})"
    s = format_number(m["value"])
    if m.get("ci_low") is not None:
        s += f" [{format_number(m['ci_low'])}, {format_number(m['ci_high'])}]"
    return s


def _inline(fig: Figure) -> dict:
    data = base64.b64encode(Path(fig.png).read_bytes()).decode("ascii")
    return {"name": fig.name, "title": fig.title, "caption": fig.caption, "src": f"data:image/png;base64,{data}",
            "csv": Path(fig.csv).name if fig.csv else None}


def render_report(path, title: str, headline: Sequence[dict], figures: Sequence[Figure],
                  tables: Sequence[dict] = (), notes: Sequence[str] = (), warnings: Sequence[str] = (),
                  config: Optional[dict] = None, verdicts: Sequence[dict] = ()) -> Path:
    """Write the report to ``path`` atomically.

    Arguments:
        headline: rows ``{"model": str, "metrics": [(label, text), ...]}`` shown first.
        figures: written figures (their PNGs are inlined; CSV sidecars are named so readers find the numbers).
        tables: ``{"title", "columns": [str], "rows": [[cell, ...]]}``.
        notes / warnings: free text (escaped).
        verdicts: ``{"model", "verdict", "reasons": [str]}`` (audit reports).
    """
    from robustness_diag import __version__

    html = _environment().get_template("report.html.j2").render(
        title=title, headline=list(headline), figures=[_inline(f) for f in figures], tables=list(tables),
        notes=list(notes), warnings=list(warnings), config=config or {}, verdicts=list(verdicts),
        version=__version__, generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return atomic_write_text(path, html)
