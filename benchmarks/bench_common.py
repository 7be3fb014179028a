"""Helpers shared by the benchmark scripts: the CPU's name for the tables' headers, and a Markdown table."""
from __future__ import annotations

import sys


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo; None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def table(title: str, header: list[str], rows: list[list], float_format: str = ".3g") -> None:
    """Prints rows under a '## title' heading as a right-aligned Markdown table (floats in float_format)."""
    cells = [[str(c) for c in header]] + [[format(c, float_format) if isinstance(c, float) else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()
