"""The results grammar: one layout for every output folder, and the record of a run.

Every stage writes to one folder whose path names what it holds. `LAYOUTS` is the only
place those paths are spelled: the workflow's rules take their wildcard patterns from it
(`pattern`), the command line and the tracker read a run's identity back from its folder
(`Run.parse`: tags and run names), and the report reads the same records. A Snakemake
wildcard constraint and a schema name pattern come from `WILDCARDS`. Mixture names
(`mop-<mixture>` folders) have their grammar here too, with the settings each asks for
(`mixture_keys`). `mop.plan` builds the grid of runs from a config on top of this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mop.errors import MopError

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
TASKS = ("probe", "hoc", "pubmedqa", "bioasq7b", "bioasq8b", "mednli", "medqa")
_NUMBER = r"[0-9]*\.?[0-9]+"
MIXTURE = (
    rf"(softmax|gumbel(-t{_NUMBER})?|moe(-k[0-9]+)?)"
    rf"(-routed(-w{_NUMBER})?)?(-prior(-p{_NUMBER})?)?(-bm25)?"
)
SCHEME = r"metis|shuffle[0-9.]+"

# What each field of a path may hold: Snakemake's wildcard constraints and the parser's.
WILDCARDS = {
    "kg": NAME,
    "model": NAME,
    "tokenizer": NAME,
    "subset": NAME,
    "k": r"\d+",
    "part": r"\d+",
    "seed": r"\d+",
    "length": r"\d+",
    "fold": r"\d+",
    "scheme": SCHEME,
    "mixture": MIXTURE,
    "task": "|".join(TASKS),
}

# Every folder of the results tree, relative to the results root.
LAYOUTS = {
    "kg": "kg/{kg}",
    "partition": "partition/{kg}/k{k}-{scheme}",
    "tokens": "tokens/{kg}/{model}.parquet",
    "adapter": "adapters/{kg}/k{k}-{scheme}/{model}/p{part}",
    "task": "tasks/{task}",
    "download": "downloads/{task}",  # only its log: the file goes to the task's data path
    "encoded": "encoded/{task}/{tokenizer}/len{length}",
    "base": "finetune/{task}/{model}/base/seed{seed}",
    "single": "finetune/{task}/{model}/adapter/{kg}/k{k}-{scheme}/p{part}/seed{seed}",
    "mop": "finetune/{task}/{model}/mop-{mixture}/{kg}/k{k}-{scheme}/seed{seed}",
    "subset": "finetune/{task}/{model}/mop-{mixture}/{kg}/k{k}-{scheme}/subset-{subset}/seed{seed}",
    "oracle": "finetune/{task}/{model}/oracle/{kg}/k{k}-{scheme}/seed{seed}",
    "zeroshot": "finetune/{task}/{model}/zeroshot/{kg}/k{k}-{scheme}/seed{seed}",
    "links": "links/{task}/{kg}/k{k}-{scheme}",
    "selection": "analysis/{task}/{model}/{kg}/k{k}-{scheme}",
    "topics": "topics/{kg}/k{k}-{scheme}",
}
# The method a fine-tuning run's kind stands for (its tag and its `mop finetune --method`).
METHODS = {
    "base": "base",
    "single": "adapter",
    "mop": "mop",
    "subset": "mop",
    "oracle": "oracle",
    "zeroshot": "zeroshot",
}
STAGES = {"adapter": "pretrain", **{kind: "finetune" for kind in METHODS}}


def _regex(layout: str) -> re.Pattern:
    out, last = [], 0
    for m in re.finditer(r"\{(\w+)\}", layout):
        out.append(re.escape(layout[last : m.start()]))
        out.append(f"(?P<{m[1]}>{WILDCARDS[m[1]]})")
        last = m.end()
    out.append(re.escape(layout[last:]))
    return re.compile(r"(?:^|/)" + "".join(out) + r"(?:/.+)?$")


_PARSERS = {kind: _regex(layout) for kind, layout in LAYOUTS.items()}
_INTS = ("k", "part", "seed", "length", "fold")


@dataclass(frozen=True)
class Run:
    """One record of the grid: a kind of folder (a key of LAYOUTS) and its fields."""

    kind: str
    kg: str | None = None
    k: int | None = None
    scheme: str | None = None
    model: str | None = None
    part: int | None = None
    task: str | None = None
    mixture: str | None = None
    subset: str | None = None
    seed: int | None = None
    tokenizer: str | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise MopError(f"unknown kind of run {self.kind!r}")

    @property
    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kind"}

    @property
    def method(self) -> str | None:
        return METHODS.get(self.kind)

    @property
    def stage(self) -> str:
        return STAGES.get(self.kind, self.kind)

    def folder(self, results: str | Path = "results") -> str:
        """The run's folder: `<results>/<layout>`."""
        try:
            return f"{results}/{LAYOUTS[self.kind].format(**self.fields)}"
        except (KeyError, ValueError) as exc:
            raise MopError(f"{self}: cannot name its folder ({exc})") from exc

    def file(self, name: str, results: str | Path = "results") -> str:
        return f"{self.folder(results)}/{name}"

    def log(self, results: str | Path = "results") -> str:
        """Its job's log: the folder's path under `<results>/logs`, as a .log file."""
        return f"{results}/logs/{LAYOUTS[self.kind].format(**self.fields)}.log"

    @classmethod
    def parse(cls, path: str | Path) -> Run:
        """The record of a run folder, or of a file below it; anything else is an error.

        The layout that explains the most of the path wins (the earliest match), so a
        KG named like a stage cannot be mistaken for that stage."""
        text = str(path).rstrip("/")
        found = [(m.start(), kind, m) for kind, p in _PARSERS.items() if (m := p.search(text))]
        if not found:
            raise MopError(f"{path}: not a folder of the results layout (see mop.layout.LAYOUTS)")
        _, kind, m = min(found, key=lambda x: x[0])
        return cls(kind, **{k: int(v) if k in _INTS else v for k, v in m.groupdict().items()})

    @classmethod
    def of(cls, kind: str, wildcards: Any) -> Run:
        """The record of a Snakemake job of this kind, from its wildcards."""
        names = {f.name for f in fields(cls)} - {"kind"}
        return cls(
            kind,
            **{k: int(v) if k in _INTS else v for k, v in dict(wildcards).items() if k in names},
        )

    @staticmethod
    def root(path: str | Path) -> str:
        """The results root a run folder lies in (`results` for `results/kg/x`)."""
        text = str(path).rstrip("/")
        found = [m.start() for p in _PARSERS.values() if (m := p.search(text))]
        if not found:
            raise MopError(f"{path}: not a folder of the results layout (see mop.layout.LAYOUTS)")
        return text[: min(found)] or "."

    def tags(self) -> dict[str, str]:
        """MLflow tags: the stage, the method and every field that is set."""
        out = {"stage": self.stage}
        if self.method:
            out["method"] = self.method
        for key, value in self.fields.items():
            if value is not None:
                out["partition" if key == "part" else key] = str(value)
        return out

    def name(self) -> str:
        """A human name: the stage, then the folder's path parts."""
        parts = LAYOUTS[self.kind].format(**self.fields).split("/")
        return " ".join([self.stage, *parts[1:]])


def pattern(kind: str, name: str = "", results: str = "results") -> str:
    """The Snakemake wildcard pattern of a kind of folder, or of a file in it."""
    path = f"{results}/{LAYOUTS[kind]}"
    return f"{path}/{name}" if name else path


def log_pattern(kind: str, results: str = "results") -> str:
    return f"{results}/logs/{LAYOUTS[kind]}.log"


def scheme_name(rate: float) -> str:
    """The partition scheme's folder and wildcard name: `metis`, or `shuffle<rate>`.

    The rate is written as Python's shortest round-trip repr (0.1 -> shuffle0.1, 1 ->
    shuffle1.0), so the name parses back to exactly the configured rate.
    """
    rate = float(rate)
    return "metis" if rate == 0 else f"shuffle{rate!r}"


def scheme_rate(scheme: str) -> float:
    """The shuffle rate of a scheme name (the inverse of `scheme_name`)."""
    if not re.fullmatch(SCHEME, scheme):
        raise MopError(f"partition scheme {scheme!r} is not metis or shuffle<rate>")
    return 0.0 if scheme == "metis" else float(scheme.removeprefix("shuffle"))


def mixture_of(name: str) -> str:
    """A mixture name as it appears in a run folder (`mop-<mixture>`)."""
    bm25_alone = name.endswith("-bm25") and not routed(name)
    if not re.fullmatch(MIXTURE, name) or bm25_alone:
        raise MopError(
            f"mixture {name!r} is not softmax, gumbel[-t<tau>] or moe[-k<top k>], "
            "optionally followed by -routed[-w<weight>] and / or -prior[-p<weight>], then "
            "optionally -bm25 (routes from the BM25 partition router instead of the entity linker)"
        )
    return name


def routed(mixture: str | None) -> bool:
    """Whether runs of this mixture read the task's links (`-routed`, `-prior`)."""
    return bool(mixture) and bool(
        re.search(rf"-(routed(-w{_NUMBER})?|prior(-p{_NUMBER})?)(-bm25)?$", mixture)
    )


# The mixture settings a MoP run reads, by what its mixture name asks for.
MIXTURE_KEYS = {
    "all": ("fusion_reg",),
    "gumbel": ("gumbel_tau",),
    "moe": ("moe_top_k", "moe_importance", "moe_load"),
    "routed": ("route_loss",),
    "prior": ("route_prior",),
}


def mixture_keys(mixture: str) -> list[str]:
    """The `finetune` keys one mixture reads: a softmax run does not read the MoE keys."""
    mixture_of(mixture)
    parts = {"all", *mixture.split("-")}
    own = {  # -w<weight> and -p<weight>: the name's own weights
        key
        for key, tag in (("route_loss", "w"), ("route_prior", "p"))
        if any(re.fullmatch(rf"{tag}{_NUMBER}", p) for p in parts)
    }
    return [k for part, keys in MIXTURE_KEYS.items() if part in parts for k in keys if k not in own]
