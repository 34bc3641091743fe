"""Entity linking by name: which partitions an input talks about.

A routed mixture (`mop.fusion`, mixture names ending in `-routed` / `-prior`) needs, per
input, a distribution over the K partitions. We get it for free from the KG: find the
entities whose names occur in the input's texts and take the partitions they belong to.

Matching is an Aho-Corasick automaton (pyahocorasick) over the entities' lower-cased
names, so one pass over a text finds every occurrence of every name. A match counts
only at word boundaries (no letter or digit on either side), and overlapping matches are
resolved longest first (then leftmost): "Atrial septal defect" wins over "septal
defect". Names shorter than `min_chars` are not matched (short synonyms and
abbreviations link everything to everything).

An input's distribution weighs every linked mention equally; a name shared by several
entities splits its mention among their partitions. Inputs without a mention get a row of
zeros and `linked = false`: they contribute nothing to the routing loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ahocorasick
import numpy as np
import polars as pl

from mop.errors import MopError
from mop.io import write_json, write_parquet
from mop.kg import ENTITY_SCHEMA, read_table
from mop.partition import MEMBERSHIP_SCHEMA, fact_partitions

# The split columns that hold text an input is about: the texts, the KG probe's candidate,
# and a choice task's options and their retrieved contexts (lists).
TEXT_FIELDS = ("text_a", "text_b", "candidate", "choices", "contexts")
SPAN = pl.Struct(
    {"field": pl.String, "start": pl.Int32, "end": pl.Int32, "entity": pl.Int32, "text": pl.String}
)


@dataclass(frozen=True)
class Span:
    """One linked mention: text[start:end] names `entities` (usually one)."""

    start: int
    end: int
    entities: tuple[int, ...]


def _lower(text: str) -> str:
    """Lower case with the same length (a few characters grow under str.lower)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


class EntityLinker:
    """Longest-match-first, word-bounded matching of entity names in text."""

    def __init__(self, names: Sequence[str | None], min_chars: int = 3):
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is None:
                continue
            key = _lower(name.strip())
            if len(key) >= min_chars:
                by_name.setdefault(key, []).append(i)
        if not by_name:
            raise MopError(f"linking: no entity name has {min_chars} or more characters")
        self.automaton = ahocorasick.Automaton()
        for key, ids in by_name.items():
            self.automaton.add_word(key, (len(key), tuple(ids)))
        self.automaton.make_automaton()
        self.names = len(by_name)

    def link(self, text: str) -> list[Span]:
        """The mentions in `text`, left to right, none overlapping."""
        low = _lower(text)
        found = []
        for last, (length, ids) in self.automaton.iter(low):
            start, end = last - length + 1, last + 1
            if start > 0 and low[start - 1].isalnum():
                continue
            if end < len(low) and low[end].isalnum():
                continue
            found.append(Span(start, end, ids))
        found.sort(key=lambda s: (s.start - s.end, s.start))
        taken = np.zeros(len(low), dtype=bool)
        kept = []
        for span in found:
            if not taken[span.start : span.end].any():
                taken[span.start : span.end] = True
                kept.append(span)
        return sorted(kept, key=lambda s: s.start)


def route_of(entities: Iterable[Sequence[int]], partition: np.ndarray, k: int) -> np.ndarray:
    """The partition distribution of some mentions (each a tuple of entity ids)."""
    mass = np.zeros(k, dtype=np.float64)
    for ids in entities:
        for e in ids:
            mass[partition[e]] += 1.0 / len(ids)
    total = mass.sum()
    return (mass / total if total > 0 else mass).astype(np.float32)


def link_frame(
    frame: pl.DataFrame, linker: EntityLinker, partition: np.ndarray, k: int
) -> pl.DataFrame:
    """Per example: id, its mentions, its partition distribution (`route`) and `linked`."""
    fields = [f for f in TEXT_FIELDS if f in frame.columns]
    columns = {f: frame[f].to_list() for f in fields}
    spans, routes = [], []
    for i in range(frame.height):
        mentions = []
        for f in fields:
            value = columns[f][i]
            texts = (
                [(f, value)]
                if not isinstance(value, list)
                else [(f"{f}[{j}]", v) for j, v in enumerate(value)]
            )
            for name, text in texts:
                if text:
                    mentions += [(name, s, text) for s in linker.link(text)]
        spans.append(
            [
                {
                    "field": f,
                    "start": s.start,
                    "end": s.end,
                    "entity": e,
                    "text": t[s.start : s.end],
                }
                for f, s, t in mentions
                for e in s.entities
            ]
        )
        routes.append(route_of((s.entities for _, s, _ in mentions), partition, k))
    route = np.stack(routes) if routes else np.zeros((0, k), dtype=np.float32)
    return pl.DataFrame(
        {
            "id": frame["id"].cast(pl.String),
            "spans": pl.Series(spans, dtype=pl.List(SPAN)),
            "route": pl.Series(route.tolist(), dtype=pl.Array(pl.Float32, k)),
            "linked": route.sum(1) > 0,
        }
    )


def coverage(
    links: pl.DataFrame, frame: pl.DataFrame, true: np.ndarray | None = None
) -> dict[str, Any]:
    """Share of inputs with a link, entities and mentions per input; where the true
    partitions are known (the KG probe: the partition of this partitioning holding each
    question's fact, -1 where it cut the fact) also how often the linked distribution's
    largest weight is the true one, over the linked inputs whose fact is inside."""
    n = links.height
    spans = links["spans"].to_list()
    entities = [len({m["entity"] for m in row}) for row in spans]
    mentions = [len({(m["field"], m["start"]) for m in row}) for row in spans]
    out: dict[str, Any] = {
        "inputs": n,
        "linked": int(links["linked"].sum()),
        "linked_share": float(links["linked"].mean()) if n else 0.0,
        "entities_per_input": float(np.mean(entities)) if n else 0.0,
        "mentions_per_input": float(np.mean(mentions)) if n else 0.0,
    }
    if true is not None and n:
        route = links["route"].to_numpy()
        judged = links["linked"].to_numpy() & (true >= 0)
        hit = route.argmax(1) == true
        out["top_is_true_partition"] = float(hit[judged].mean()) if judged.any() else 0.0
    return out


def split_files(task_dir: str | Path) -> list[Path]:
    """A task's split files, relative order kept (cross-validated tasks: every fold)."""
    root = Path(task_dir)
    files = sorted(root.glob("*.parquet")) + sorted(root.glob("fold*/*.parquet"))
    if not files:
        raise MopError(f"{root}: no task splits to link (run the task's prepare step)")
    return files


def read_links(path: str | Path, ids: Sequence[str], k: int) -> np.ndarray:
    """The (n, K) routes of some example ids from a links.parquet (zeros where unlinked)."""
    links = read_table(path)
    width = links["route"].dtype.size if links.height else k
    if width != k:
        raise MopError(f"{path}: routes over {width} partitions, this run has {k} adapters")
    index = dict(zip(links["id"].to_list(), range(links.height), strict=True))
    missing = [i for i in ids if i not in index]
    if missing:
        raise MopError(f"{path}: no links for example {missing[0]!r} (run `mop link` again)")
    route = links["route"].to_numpy().astype(np.float32)
    return route[[index[i] for i in ids]]


def entity_partitions(kg_dir: str | Path, partition_dir: str | Path) -> pl.DataFrame:
    """Every entity's name and partition, one row per entity id in id order: all that
    linking needs (an export of a -prior model carries this table)."""
    entities = read_table(Path(kg_dir) / "entities.parquet", ENTITY_SCHEMA)
    membership = read_table(Path(partition_dir) / "membership.parquet", MEMBERSHIP_SCHEMA)
    if membership.height != entities.height:
        raise MopError(
            f"{partition_dir}/membership.parquet: {membership.height} entities, "
            f"{kg_dir} has {entities.height}"
        )
    partition = membership.sort("entity")["partition"]
    return pl.DataFrame({"name": entities.sort("id")["name"], "partition": partition})


def run_link(
    task_dir: str | Path,
    kg_dir: str | Path,
    partition_dir: str | Path,
    out_dir: str | Path,
    min_chars: int = 3,
    facts: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Link every split of a task against a KG's partitions; write links.parquet (one row
    per distinct example id) and coverage.json (per split file). `facts`: the task's
    (head, tail) entity columns, where it has them (`TaskSpec.facts`)."""
    table = entity_partitions(kg_dir, partition_dir)
    partition = table["partition"].to_numpy()
    k = int(partition.max()) + 1
    linker = EntityLinker(table["name"].to_list(), min_chars=min_chars)
    frames, report = [], {}
    for path in split_files(task_dir):
        frame = read_table(path)
        links = link_frame(frame, linker, partition, k)
        name = str(path.relative_to(task_dir).with_suffix(""))
        true = None
        if facts:
            heads, tails = (frame[c].to_numpy() for c in facts)
            true = fact_partitions(heads, tails, partition)
        report[name] = coverage(links, frame, true)
        frames.append(links)
    links = pl.concat(frames).unique("id", keep="first", maintain_order=True)
    summary = {
        "kg": str(kg_dir),
        "partition": str(partition_dir),
        "k": k,
        "names": linker.names,
        "min_chars": min_chars,
        "splits": report,
    }
    write_parquet(links, Path(out_dir) / "links.parquet")
    write_json(summary, Path(out_dir) / "coverage.json")
    return summary
