"""The table engine: cells of mean ± std over seeds with the paper's marks, and tables
written as Markdown, CSV (numbers) and LaTeX."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from mop.io import atomic_path


@dataclass
class Cell:
    """mean ± std over n seeds (x100), with the paper's marks against the base model."""

    values: np.ndarray
    base: np.ndarray | None = None
    bold: bool = False

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def std(self) -> float:
        return float(self.values.std(ddof=1)) if self.values.size > 1 else 0.0

    @property
    def p_value(self) -> float | None:
        """Two-sided Welch t-test against the base model's runs."""
        if self.base is None or self.values.size < 2 or self.base.size < 2:
            return None
        return float(stats.ttest_ind(self.values, self.base, equal_var=False).pvalue)

    @property
    def up(self) -> bool:
        return self.base is not None and self.base.size > 0 and self.mean > self.base.mean()

    @property
    def dagger(self) -> bool:
        p = self.p_value
        return self.up and p is not None and p < 0.05

    def _text(self, dagger: str, pm: str, up: str) -> str:
        """One run has no spread: its cell shows the value alone, not a misleading ± 0."""
        spread = f"{pm}{self.std:.2f}" if self.values.size > 1 else ""
        return f"{self.mean:.2f}{dagger if self.dagger else ''}{spread}{up if self.up else ''}"

    def markdown(self) -> str:
        text = self._text("†", " ± ", " ↑")
        return f"**{text}**" if self.bold else text

    def latex(self) -> str:
        text = self._text(r"$^\dagger$", r" $\pm$ ", r" $\uparrow$")
        return rf"\textbf{{{text}}}" if self.bold else text


@dataclass
class Table:
    """A results table: a header, rows of strings or cells, and a caption."""

    name: str
    caption: str
    header: list[str]
    rows: list[list[str | Cell]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def bold_best(self, first: int = 1) -> None:
        """Bold the highest mean of every cell column (ties all bold)."""
        for j in range(first, len(self.header)):
            cells = [r[j] for r in self.rows if isinstance(r[j], Cell)]
            if cells:
                best = max(c.mean for c in cells)
                for c in cells:
                    c.bold = np.isclose(c.mean, best)

    def markdown(self) -> str:
        def fmt(x: str | Cell) -> str:
            return x.markdown() if isinstance(x, Cell) else x

        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in self.rows]
        found = "".join(f"- {f}\n" for f in self.findings)
        return "\n".join(lines) + "\n\n" + self.caption + "\n" + (f"\n{found}" if found else "")

    def latex(self) -> str:
        def esc(text: str) -> str:
            for a, b in (
                ("\\", r"\textbackslash{}"),
                ("&", r"\&"),
                ("%", r"\%"),
                ("_", r"\_"),
                ("#", r"\#"),
                ("±", r"$\pm$"),
            ):
                text = text.replace(a, b)
            return text

        def fmt(x: str | Cell) -> str:
            return x.latex() if isinstance(x, Cell) else esc(x)

        cols = "l" + "c" * (len(self.header) - 1)
        body = [" & ".join(esc(h) for h in self.header) + r" \\", r"\midrule"]
        body += [" & ".join(fmt(x) for x in row) + r" \\" for row in self.rows]
        return (
            "\n".join(
                [
                    r"\begin{table}[t]",
                    r"\centering",
                    rf"\begin{{tabular}}{{{cols}}}",
                    r"\toprule",
                    *body,
                    r"\bottomrule",
                    r"\end{tabular}",
                    rf"\caption{{{esc(self.caption)}}}",
                    rf"\label{{tab:{self.name}}}",
                    r"\end{table}",
                ]
            )
            + "\n"
        )

    def frame(self) -> pl.DataFrame:
        """The same layout with numbers: a cell column becomes _mean, _std, _n, _p columns."""
        data: dict[str, list] = {}
        for j, h in enumerate(self.header):
            column = [r[j] for r in self.rows]
            if any(isinstance(x, Cell) for x in column):
                data[f"{h}_mean"] = [x.mean if isinstance(x, Cell) else None for x in column]
                data[f"{h}_std"] = [x.std if isinstance(x, Cell) else None for x in column]
                data[f"{h}_n"] = [x.values.size if isinstance(x, Cell) else None for x in column]
                data[f"{h}_p"] = [x.p_value if isinstance(x, Cell) else None for x in column]
            else:
                data[h] = column
        return pl.DataFrame(data, strict=False)

    def write(self, out_dir: str | Path, stem: str | None = None) -> list[Path]:
        out = Path(out_dir)
        stem = stem or self.name
        paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.tex"]
        with atomic_path(paths[0]) as tmp:
            tmp.write_text(self.markdown())
        with atomic_path(paths[1]) as tmp:
            self.frame().write_csv(tmp)
        with atomic_path(paths[2]) as tmp:
            tmp.write_text(self.latex())
        return paths


MARKS = (
    "Test metric x 100, mean ± std over seeds (a value alone: one run). "
    "↑: mean above the base model's; "
    "†: two-sided Welch t-test against the base model's runs, p < 0.05; "
    "bold: best in the column."
)


def values(runs: pl.DataFrame, **match: object) -> np.ndarray:
    return split_values(runs, "test", **match)


def split_values(runs: pl.DataFrame, split: str, **match: object) -> np.ndarray:
    """One split's main metric x 100 of the runs matching every given tag."""
    sel = runs
    for key, value in match.items():
        sel = sel.filter(pl.col(key).is_null() if value is None else pl.col(key) == value)
    return sel[split].drop_nulls().to_numpy() * 100


@dataclass
class CountTable(Table):
    """A table of formatted counts whose CSV holds the raw numbers, one row per setup."""

    numbers: pl.DataFrame = field(default_factory=pl.DataFrame)

    def frame(self) -> pl.DataFrame:
        return self.numbers
