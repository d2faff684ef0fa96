"""Conformance reports: one JSON file (for machines and CI artifacts) and one Markdown file (for people).

``write_reports(results, ctx, out_dir, started, seconds)`` writes ``conformance-<platform>.json`` and
``conformance-<platform>.md`` into ``out_dir`` and returns both paths. Both carry the platform's facts
(``Platform.describe()``), package versions, host facts and every case: check, dtype, measured error,
tolerance, status, and the reason for a failure or a skip. ``format_table`` is the console view.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform as _host
from pathlib import Path
from typing import Any

from portable_rl.conformance.registry import CheckResult, Context
from portable_rl.conformance.runner import summary

PACKAGES = (
    "portable-rl",
    "torch",
    "megatron-core",
    "ray",
    "transformers",
    "safetensors",
    "sglang",
    "sglang-router",
    "numpy",
)
SCHEMA = 1


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def build_report(
    results: list[CheckResult], ctx: Context, started: _dt.datetime, seconds: float
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "summary": summary(results),
        "platform": ctx.platform.describe(),
        "versions": package_versions(),
        "host": {
            "python": _host.python_version(),
            "machine": _host.machine(),
            "system": _host.system(),
            "cpu_count": os.cpu_count(),
        },
        "results": [r.to_dict() for r in results],
    }


def format_table(results: list[CheckResult]) -> str:
    rows = [("check", "dtype", "error", "tolerance", "status", "reason")]
    for r in results:
        rows.append((r.check, r.dtype or "-", _fmt(r.error), _fmt(r.tolerance), r.status, r.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)]
        lines.append("  ".join(cells + [row[5]]).rstrip())
    return "\n".join(lines)


def to_markdown(report: dict[str, Any]) -> str:
    p = report["platform"]
    s = report["summary"]
    out = [
        f"# Conformance report: {p['name']}",
        "",
        f"{s['pass']} passed, {s['fail']} failed, {s['skipped']} skipped "
        f"in {report['seconds']} s (started {report['started']}).",
        "",
        "| check | dtype | measured error | tolerance | status | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        reason = (r["reason"] or r["detail"] or "").replace("|", "\\|").replace("\n", " ")
        out.append(
            f"| `{r['check']}` | {r['dtype'] or '-'} | {_fmt(r['error'])} | {_fmt(r['tolerance'])} "
            f"| {r['status']} | {reason} |"
        )
    out += ["", "## What each check measures", ""]
    seen = set()
    for r in report["results"]:
        if r["check"] not in seen:
            seen.add(r["check"])
            out.append(f"- `{r['check']}`: {r['measures']}")
    out += ["", "## Platform", "", "| fact | value |", "|---|---|"]
    for key, value in p.items():
        if key != "devices":
            out.append(f"| {key} | `{json.dumps(value, default=str)}` |")
    out.append(f"| devices | {len(p['devices'])} |")
    for d in p["devices"]:
        out.append(f"| device {d['index']} | {d['name']} {d.get('arch') or ''} |")
    out += ["", "## Versions", "", "| package | version |", "|---|---|"]
    for pkg, ver in report["versions"].items():
        out.append(f"| {pkg} | {ver or 'not installed'} |")
    h = report["host"]
    out += ["", f"Host: Python {h['python']}, {h['system']} {h['machine']}, {h['cpu_count']} CPUs.", ""]
    return "\n".join(out)


def write_reports(
    results: list[CheckResult],
    ctx: Context,
    out_dir: str | Path,
    started: _dt.datetime,
    seconds: float,
) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(results, ctx, started, seconds)
    stem = f"conformance-{ctx.platform.name}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(report), encoding="utf-8")
    return json_path, md_path
