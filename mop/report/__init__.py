"""The paper's tables and figures from the runs on disk.

Every run's identity comes from its folder (the results grammar, mop.plan), its numbers
from `metrics.json`; adapters hold `metrics.json` with their knowledge-probe scores; KGs
and partitions hold `stats.json`. The report reads only those files (the rules pass the
exact list), so it can be rebuilt at any time and never depends on the tracking server.

- `runs`: finished runs as one table;
- `table`: the table engine (cells with the paper's marks; Markdown, CSV, LaTeX);
- `tables`, `figures`: the paper's tables and figures;
- `registry`: every report by name, what it reads and where it goes (the CLI and the
  workflow's report rules both read it).
"""

from mop.report.runs import load_runs
from mop.report.table import Cell, CountTable, Table

__all__ = ["Cell", "CountTable", "Table", "load_runs"]
