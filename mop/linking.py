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

The second router needs no entity linker (mixture names ending in `-bm25`): each
partition is one document, the names and synonyms of its entities, and BM25 (bm25s)
scores every partition against all of an input's text; the routes are
softmax(scores / temperature). It asks no name to occur whole, so a synonym, a partial
name or a paraphrase still routes by the words it shares with the partitions' names; only
an input sharing no word with any partition is unrouted. Both routers' columns are
written by the same link job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ahocorasick
import bm25s
import numpy as np
import polars as pl

from mop.errors import MopError
from mop.io import write_json, write_parquet
from mop.kg import ENTITY_SCHEMA, SYNONYM_SCHEMA, read_table
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


class PartitionRetriever:
    """BM25 over one document per partition (its entities' names and synonyms): how well
    each partition's vocabulary matches an input, as a distribution over partitions."""

    def __init__(self, documents: Sequence[str], temperature: float = 1.0):
        if temperature <= 0:
            raise MopError(f"config key linking.bm25_temperature: {temperature} is not > 0")
        self.k = len(documents)
        self.temperature = temperature
        self.index = bm25s.BM25()
        tokens = bm25s.tokenize(list(documents), show_progress=False, return_ids=False)
        self.index.index(tokens, show_progress=False)
        self.vocabulary = set(self.index.vocab_dict)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(n, K) BM25 scores of each text against each partition."""
        if not len(texts):
            return np.zeros((0, self.k), dtype=np.float32)
        tokens = bm25s.tokenize(list(texts), show_progress=False, return_ids=False)
        rows = [[w for w in t if w in self.vocabulary] for t in tokens]  # others score 0
        zero = np.zeros(self.k)
        return np.stack([self.index.get_scores(t) if t else zero for t in rows]).astype(np.float32)

    def routes(self, texts: Sequence[str]) -> np.ndarray:
        """softmax(scores / temperature) per text; a row of zeros where no word matches."""
        s = self.scores(texts).astype(np.float64)
        e = np.exp((s - s.max(1, keepdims=True)) / self.temperature)
        q = e / e.sum(1, keepdims=True)
        q[s.max(1) <= 0] = 0.0
        return q.astype(np.float32)


def partition_documents(names: Sequence[str | None], partition: np.ndarray, k: int) -> list[str]:
    """One text per partition: the names of its entities (one per line)."""
    docs: list[list[str]] = [[] for _ in range(k)]
    for name, p in zip(names, partition, strict=True):
        if name:
            docs[int(p)].append(name)
    return ["\n".join(d) for d in docs]


def input_text(frame: pl.DataFrame) -> list[str]:
    """All of each input's text fields (lists flattened) as one string per row."""
    fields = [f for f in TEXT_FIELDS if f in frame.columns]
    columns = {f: frame[f].to_list() for f in fields}
    out = []
    for i in range(frame.height):
        parts: list[str] = []
        for f in fields:
            value = columns[f][i]
            parts += [v for v in (value if isinstance(value, list) else [value]) if v]
        out.append("\n".join(parts))
    return out


def link_frame(
    frame: pl.DataFrame,
    linker: EntityLinker,
    partition: np.ndarray,
    k: int,
    retriever: PartitionRetriever | None = None,
) -> pl.DataFrame:
    """Per example: id, its mentions, its partition distribution (`route`) and `linked`;
    with a retriever also the BM25 router's `bm25_route` and `bm25_linked`."""
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
    out = pl.DataFrame(
        {
            "id": frame["id"].cast(pl.String),
            "spans": pl.Series(spans, dtype=pl.List(SPAN)),
            "route": pl.Series(route.tolist(), dtype=pl.Array(pl.Float32, k)),
            "linked": route.sum(1) > 0,
        }
    )
    if retriever is None:
        return out
    bm25 = retriever.routes(input_text(frame))
    return out.with_columns(
        bm25_route=pl.Series(bm25.tolist(), dtype=pl.Array(pl.Float32, k)),
        bm25_linked=pl.Series(bm25.sum(1) > 0),
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
    if "bm25_route" in links.columns and n:
        routed = links["bm25_linked"].to_numpy()
        out["bm25_linked_share"] = float(routed.mean())
        if true is not None:
            judged = routed & (true >= 0)
            hit = links["bm25_route"].to_numpy().argmax(1) == true
            out["bm25_top_is_true_partition"] = float(hit[judged].mean()) if judged.any() else 0.0
    return out


def split_files(task_dir: str | Path) -> list[Path]:
    """A task's split files, relative order kept (cross-validated tasks: every fold)."""
    root = Path(task_dir)
    files = sorted(root.glob("*.parquet")) + sorted(root.glob("fold*/*.parquet"))
    if not files:
        raise MopError(f"{root}: no task splits to link (run the task's prepare step)")
    return files


ROUTERS = {"names": "route", "bm25": "bm25_route"}  # router -> its links.parquet column


def read_links(path: str | Path, ids: Sequence[str], k: int, router: str = "names") -> np.ndarray:
    """The (n, K) routes of some example ids from a links.parquet (zeros where unlinked),
    from the entity linker (`names`) or the BM25 partition router (`bm25`)."""
    links = read_table(path)
    column = ROUTERS[router]
    if column not in links.columns:
        raise MopError(f"{path}: no {column} column (made before the {router} router): link again")
    width = links[column].dtype.size if links.height else k
    if width != k:
        raise MopError(f"{path}: routes over {width} partitions, this run has {k} adapters")
    index = dict(zip(links["id"].to_list(), range(links.height), strict=True))
    missing = [i for i in ids if i not in index]
    if missing:
        raise MopError(f"{path}: no links for example {missing[0]!r} (run `mop link` again)")
    route = links[column].to_numpy().astype(np.float32)
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


def name_partitions(kg_dir: str | Path, partition_dir: str | Path) -> pl.DataFrame:
    """Every name and synonym of the KG's entities with the entity's partition: the
    BM25 router's documents (an export of a -bm25 -prior model carries this table)."""
    table = entity_partitions(kg_dir, partition_dir).select("name", "partition")
    path = Path(kg_dir) / "synonyms.parquet"
    if path.is_file():
        partition = table["partition"]
        synonyms = read_table(path, SYNONYM_SCHEMA)
        table = pl.concat(
            [
                table,
                pl.DataFrame(
                    {
                        "name": synonyms["name"],
                        "partition": partition.gather(synonyms["entity"].to_numpy()),
                    }
                ),
            ]
        )
    return table


def run_link(
    task_dir: str | Path,
    kg_dir: str | Path,
    partition_dir: str | Path,
    out_dir: str | Path,
    min_chars: int = 3,
    facts: tuple[str, ...] = (),
    bm25_temperature: float = 1.0,
) -> dict[str, Any]:
    """Link every split of a task against a KG's partitions, with the entity linker and
    the BM25 partition router; write links.parquet (one row per distinct example id) and
    coverage.json (per split file). `facts`: the task's (head, tail) entity columns, where
    it has them (`TaskSpec.facts`)."""
    table = entity_partitions(kg_dir, partition_dir)
    partition = table["partition"].to_numpy()
    k = int(partition.max()) + 1
    linker = EntityLinker(table["name"].to_list(), min_chars=min_chars)
    names = name_partitions(kg_dir, partition_dir)
    retriever = PartitionRetriever(
        partition_documents(names["name"].to_list(), names["partition"].to_numpy(), k),
        bm25_temperature,
    )
    frames, report = [], {}
    for path in split_files(task_dir):
        frame = read_table(path)
        links = link_frame(frame, linker, partition, k, retriever)
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
        "bm25_temperature": bm25_temperature,
        "splits": report,
    }
    write_parquet(links, Path(out_dir) / "links.parquet")
    write_json(summary, Path(out_dir) / "coverage.json")
    return summary
