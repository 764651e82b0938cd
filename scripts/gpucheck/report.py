"""Seconds per step from a prompt's progress events, and the GPU check's table (markdown and JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 2**30
MEMORY_TITLES = (("torch_allocated", "peak torch alloc GiB"), ("device_used", "peak device used GiB"),
                 ("aimdo_vram", "peak aimdo GiB"), ("process_rss", "peak RSS GiB"))


def seconds_per_step(events: list, node_id: str) -> float | None:
    """Mean seconds per step of node `node_id`, from its progress events (receive time, value): the time from
    the first update (after step 1, which also loads weights and fills caches) to the last, over the steps in
    between. ComfyUI's ProgressBar always sends the first and the last update and may drop others (v0.33
    throttles updates without a preview), which does not change this. None with fewer than two updates."""
    updates = [(t, data["value"]) for t, kind, data in events
               if kind == "progress" and str(data.get("node")) == node_id]
    if len(updates) < 2:
        return None
    (t0, v0), (t1, v1) = updates[0], updates[-1]
    return (t1 - t0) / (v1 - v0) if v1 > v0 else None


@dataclass
class Row:
    family: str
    mode: str
    size: int
    steps: int
    ok: bool = False
    seconds: float = 0.0
    step_seconds: float | None = None
    memory: dict = field(default_factory=dict)
    finite: bool | None = None
    error: str | None = None
    note: str = ""


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value and base else "–"


def _gib(value: float | None) -> str:
    return f"{value / GIB:.2f}" if value else "–"


def memory_columns(rows: list[Row]) -> list[tuple[str, str]]:
    """(memory key, column title) present in any row: the device's and torch's peaks on a GPU, RSS on a CPU."""
    return [(key, title) for key, title in MEMORY_TITLES if any(row.memory.get(key) for row in rows)]


def summary(row: Row) -> str:
    """One line for the console as the check goes."""
    memory = ", ".join(f"{key} {_gib(value)} GiB" for key, value in row.memory.items()
                       if key in dict(MEMORY_TITLES) and value)
    step = f"{row.step_seconds:.3f} s/step" if row.step_seconds else "– s/step"
    first_line = (row.error or "").strip().splitlines()[:1]
    outcome = "ok" if row.ok else "FAILED" + (f": {first_line[0][:300]}" if first_line else "")
    return f"{row.family} {row.mode}: {outcome}; {step}; {memory}; {row.seconds:.1f} s" + (f" ({row.note})" if row.note else "")


def markdown(rows: list[Row], header: dict) -> str:
    lines = [f"# GPU check: {header.get('title', '')}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items() if key != "title"]
    columns = memory_columns(rows)
    lines += ["", "| family | mode | size | steps | s/step | × plain | "
              + " | ".join(f"{title} | × plain" for _, title in columns) + " | prompt s | result |",
              "|" + "---|" * (8 + 2 * len(columns))]
    plain = {row.family: row for row in rows if row.mode == "plain" and row.ok}
    for row in rows:
        base = plain.get(row.family) if row.mode not in ("warmup", "decoder") else None
        cells = [row.family, row.mode, f"{row.size}²", str(row.steps),
                 f"{row.step_seconds:.3f}" if row.step_seconds else "–",
                 _ratio(row.step_seconds, base.step_seconds if base else None)]
        for key, _ in columns:
            cells += [_gib(row.memory.get(key)), _ratio(row.memory.get(key), base.memory.get(key) if base else None)]
        result = "ok" if row.ok else "FAILED"
        if row.finite is False:
            result += ", non-finite output"
        if row.note:
            result += f" ({row.note})"
        cells += [f"{row.seconds:.1f}", result]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [row for row in rows if not row.ok]
    if failures:
        lines += ["", "## Failures", ""]
        for row in failures:
            lines += [f"### {row.family} {row.mode}", "", "```", (row.error or "").strip()[:6000], "```", ""]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, rows: list[Row], header: dict) -> str:
    """Write report.md and report.json (again after every prompt, so a run cut short keeps what it measured)."""
    text = markdown(rows, header)
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]},
                                                    indent=1, default=str))
    return text
