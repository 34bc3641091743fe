"""A synthetic yes/no probe of infused knowledge, built from the knowledge graph itself.

Not one of the paper's benchmarks: it asks "Is <phenotype> a feature of <disease>?" about
the HPO graph, so that the embedded default can test whether knowledge infused into the
partition adapters reaches a downstream task.

- Facts: triples of one relation ("has phenotype") whose head and tail lie in the same
  partition, i.e. exactly the facts some adapter was trained on; with `inside_at` (other
  partitionings, e.g. K = 8 and 20 of a sweep) only facts inside one partition in every
  one of them, and swapped pairs taken within one partition at every K, so that at a
  finer K every question (negatives too) is about entities its adapters were trained on
  together: the K sweep measures the mixture's routing, not facts it cut.
- Split by disease: a test disease never appears in the probe's training split, so a model
  can only answer its questions from what it knew before fine-tuning (the base model's
  general knowledge, or the adapters' infused facts).
- Negatives are swapped pairs: two positives (d1, p1), (d2, p2) of one partition give the
  negatives (d1, p2) and (d2, p1) (checked not to be facts). Every disease and phenotype
  is then asked about once with "yes" and once with "no", so priors on names, frequencies
  or partitions score exactly 0.5.
- Every (disease, phenotype) question is asked once per split: a swap whose negative was
  already asked is not taken, so ids (`<split>-<disease>-<phenotype>`) are unique by
  construction (and checked like every task's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mop.errors import MopError
from mop.kg import KnowledgeGraph, read_kg
from mop.partition import fact_partitions, read_membership
from mop.tasks import SPLITS, TaskSpec, accuracy, write_splits

SPEC = TaskSpec(
    name="probe",
    labels=("no", "yes"),
    metric=accuracy,
    main_metric="accuracy",
    facts=("disease", "phenotype"),
)
DEFAULT_TEMPLATE = "Is {tail} a feature of {head}?"


def _pair_up(
    pos: list[tuple[int, int]],
    facts: set[tuple[int, int]],
    asked: set[tuple[int, int]],
    rng: np.random.Generator,
    window: int = 64,
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Greedy swapped-pair matching of positives; unmatched positives are dropped.

    `asked` holds the negatives already taken, in this partition or an earlier one of
    the split, so that no question is asked twice."""
    order = rng.permutation(len(pos))
    pending: list[tuple[int, int]] = []
    pairs = []
    for i in order:
        d1, p1 = pos[i]
        for j in range(len(pending) - 1, max(-1, len(pending) - 1 - window), -1):
            d2, p2 = pending[j]
            swaps = ((d1, p2), (d2, p1))
            if d1 != d2 and p1 != p2 and not any(q in facts or q in asked for q in swaps):
                pairs.append(((d1, p1), (d2, p2)))
                asked.update(swaps)
                pending.pop(j)
                break
        else:
            pending.append((d1, p1))
    return pairs


@dataclass(frozen=True)
class Wording:
    """How questions name their entities. By default exactly as the KG does, so exact-name
    linking finds every entity (and a link prior routes by the answer key). A fair probe
    for linking names them as text does: a share of phenotypes by one of their synonyms,
    a share of diseases by part of their name (the first half of its words), and the
    question (format `question`) in one of several paraphrases."""

    synonyms: float = 0.0
    partial: float = 0.0
    templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))
        for t in self.templates:
            if "{head}" not in t or "{tail}" not in t:
                raise MopError(
                    f"tasks.probe.wording.templates: {t!r} must name {{head}} and {{tail}}"
                )


def partial_name(name: str) -> str:
    """The first half of a name's words (rounded up): "Marfan syndrome" -> "Marfan"."""
    words = name.split()
    return " ".join(words[: math.ceil(len(words) / 2)]) if len(words) > 1 else name


def word(
    frame: pl.DataFrame,
    names: list[str],
    synonyms: dict[int, list[str]],
    wording: Wording,
    seed: int,
    split: str,
) -> tuple[list[str], list[str], list[str]]:
    """Each question's disease and phenotype names and template (empty: the default),
    drawn with their own seeded generator so that the questions themselves (and the
    exact-name probe) do not depend on the wording."""
    rng = np.random.default_rng([seed, 1, SPLITS.index(split)])
    n = frame.height
    use_synonym = rng.random(n) < wording.synonyms
    use_partial = rng.random(n) < wording.partial
    pick = rng.random(n)
    heads, tails = [], []
    for i, (d, p) in enumerate(frame.select("disease", "phenotype").iter_rows()):
        heads.append(partial_name(names[d]) if use_partial[i] else names[d])
        own = synonyms.get(p)
        tails.append(own[int(pick[i] * len(own))] if use_synonym[i] and own else names[p])
    texts = []
    if wording.templates:
        texts = [wording.templates[j] for j in rng.integers(len(wording.templates), size=n)]
    return heads, tails, texts


@dataclass(frozen=True)
class ProbeFacts:
    """The facts of the probe's relation: (disease, phenotype) = (head, tail) arrays,
    which of them lie inside one partition (at every K of `inside_at`), each entity's
    partition in the probe's partitioning and the group swapped pairs are drawn within."""

    heads: np.ndarray
    tails: np.ndarray
    inside: np.ndarray  # bool, per fact
    part: np.ndarray  # per entity
    group: np.ndarray  # per entity: one partition at every K
    known: set[tuple[int, int]]  # every fact, so that no negative is one

    @classmethod
    def read(
        cls,
        kg: KnowledgeGraph,
        relation: str,
        partition_dir: str | Path,
        inside_at: Sequence[str | Path],
        kg_dir: str | Path,
    ) -> ProbeFacts:
        rel = kg.relations.filter(pl.col("name") == relation)
        if rel.height == 0:
            raise MopError(f"tasks.probe.relation: {relation!r} is not a relation of {kg_dir}")
        part = read_membership(partition_dir)
        facts_df = kg.triples.filter(pl.col("relation") == rel["id"][0])
        heads = facts_df["head"].to_numpy()
        tails = facts_df["tail"].to_numpy()
        inside = part[heads] == part[tails]
        # Swapped pairs come from one group: entities in one partition at every K, so that
        # a negative's disease and phenotype, like a positive's, share a partition at each K.
        group = part
        if inside_at:
            memberships = [part, *(read_membership(other) for other in inside_at)]
            for membership in memberships[1:]:
                inside &= fact_partitions(heads, tails, membership) >= 0
            group = np.unique(np.stack(memberships, 1), axis=0, return_inverse=True)[1]
            group = group.reshape(-1)
        known = set(zip(heads.tolist(), tails.tolist(), strict=True))
        return cls(heads, tails, inside, part, group, known)

    def split_diseases(
        self, shares: tuple[float, float, float], rng: np.random.Generator
    ) -> dict[int, str]:
        """Each disease's split: a seeded shuffle of the diseases cut at `shares`."""
        diseases = np.unique(self.heads[self.inside])
        diseases = diseases[rng.permutation(diseases.size)]
        cuts = np.cumsum([round(s * diseases.size) for s in shares[:2]])
        return {
            int(d): SPLITS[int(np.searchsorted(cuts, i, side="right"))]
            for i, d in enumerate(diseases)
        }

    def questions(
        self, split: str, split_of: dict[int, str], rng: np.random.Generator
    ) -> pl.DataFrame:
        """A split's questions, four per swapped pair (two positives, their two swaps),
        pairs taken within each group in turn."""
        rows = []
        asked: set[tuple[int, int]] = set()
        heads, tails = self.heads[self.inside], self.tails[self.inside]
        of_split = np.fromiter((s == split for s in split_of.values()), bool, len(split_of))
        chosen = np.zeros(self.group.size, bool)
        chosen[np.fromiter(split_of, np.int64, len(split_of))[of_split]] = True
        heads, tails = heads[chosen[heads]], tails[chosen[heads]]
        # One sort instead of a scan per group: rows (group, disease, phenotype), unique.
        facts = np.unique(np.stack([self.group[heads], heads, tails], 1), axis=0)
        starts = np.searchsorted(facts[:, 0], np.unique(self.group))
        ends = np.append(starts[1:], len(facts))
        for start, end in zip(starts, ends, strict=True):
            pos = [(h, t) for h, t in facts[start:end, 1:].tolist()]
            for (d1, p1), (d2, p2) in _pair_up(pos, self.known, asked, rng):
                pair = len(rows) // 4
                for d, ph, label in ((d1, p1, 1), (d2, p2, 1), (d1, p2, 0), (d2, p1, 0)):
                    rows.append((pair, int(self.part[d1]), d, ph, label))
        return pl.DataFrame(rows, schema=QUESTION_SCHEMA, orient="row")


QUESTION_SCHEMA = {
    "pair": pl.Int32,
    "partition": pl.Int32,
    "disease": pl.Int32,
    "phenotype": pl.Int32,
    "label": pl.Int64,
}


def sample_pairs(frame: pl.DataFrame, limit: int | None, rng: np.random.Generator) -> pl.DataFrame:
    """The pairs kept (all, or a seeded sample of `limit` questions' worth), sorted."""
    n_pairs = frame["pair"].n_unique() if frame.height else 0
    keep = rng.permutation(n_pairs)
    if limit is not None:
        keep = keep[: max(1, limit // 4)]
    return frame.filter(pl.col("pair").is_in(keep.tolist())).sort(["pair", "label"])


def entity_synonyms(kg: KnowledgeGraph, wording: Wording, kg_dir: str | Path) -> dict:
    """Each entity's synonyms (entity id -> names), for a wording that uses them."""
    others: dict[int, list[str]] = {}
    if kg.synonyms is not None:
        for e, n in kg.synonyms.iter_rows():
            others.setdefault(e, []).append(n)
    if wording.synonyms and not others:
        raise MopError(
            f"tasks.probe.wording.synonyms: {kg_dir} has no synonyms (synonyms.parquet; the "
            "HPO and OBO sources write them)"
        )
    return others


def phrase(
    frame: pl.DataFrame,
    split: str,
    words: tuple[list[str], list[str], list[str]],
    relation: str,
    format: str,
    template: str,
) -> pl.DataFrame:
    """A split's questions as text (`word`'s names and templates), in the task's columns:
    one question (format `question`), or the disease and the relation (`pair`)."""
    head_names, tail_names, texts = words
    frame = frame.with_columns(
        id=pl.format("{}-{}-{}", pl.lit(split), pl.col("disease"), pl.col("phenotype")),
        candidate=pl.Series(tail_names, dtype=pl.String),
    )
    if format == "pair":
        frame = frame.with_columns(
            text_a=pl.Series(head_names, dtype=pl.String), text_b=pl.lit(relation)
        )
    else:
        questions = [
            (texts[i] if texts else template).format(head=h, tail=t)
            for i, (h, t) in enumerate(zip(head_names, tail_names, strict=True))
        ]
        frame = frame.with_columns(
            text_a=pl.Series(questions, dtype=pl.String),
            text_b=pl.lit(None, dtype=pl.String),
        )
    columns = ("text_a", "text_b", "candidate", "label", "pair", "partition", "disease")
    return frame.select("id", *columns, "phenotype")


def build_probe(
    kg_dir: str | Path,
    partition_dir: str | Path,
    *,
    relation: str = "has phenotype",
    shares: tuple[float, float, float] = (0.6, 0.2, 0.2),
    max_questions: dict[str, int] | None = None,
    template: str = DEFAULT_TEMPLATE,
    format: str = "question",
    seed: int = 0,
    inside_at: Sequence[str | Path] = (),
    wording: dict[str, Any] | None = None,
) -> dict[str, pl.DataFrame]:
    """The probe's train/dev/test questions (columns described in the module docstring);
    `partition` is the fact's partition in `partition_dir`."""
    kg = read_kg(kg_dir)
    facts = ProbeFacts.read(kg, relation, partition_dir, inside_at, kg_dir)
    rng = np.random.default_rng(seed)  # one stream, drawn in this order: keep it
    split_of = facts.split_diseases(shares, rng)
    names = kg.entities["name"].to_list()
    how = Wording(**(wording or {}))
    synonyms = entity_synonyms(kg, how, kg_dir)
    out: dict[str, pl.DataFrame] = {}
    for split in SPLITS:
        frame = facts.questions(split, split_of, rng)
        frame = sample_pairs(frame, (max_questions or {}).get(split), rng)
        if frame.height == 0:
            raise MopError(f"tasks.probe: no {split} questions could be built from {partition_dir}")
        words = word(frame, names, synonyms, how, seed, split)
        out[split] = phrase(frame, split, words, relation, format, template)
    return out


def prepare(kg_dir: str | Path, partition_dir: str | Path, out_dir: str | Path, **kwargs) -> dict:
    """Write the probe's splits and a summary; return the summary."""
    splits = build_probe(kg_dir, partition_dir, **kwargs)
    return write_splits(
        splits,
        SPEC,
        out_dir,
        kg=str(kg_dir),
        partition=str(partition_dir),
        inside_at=[str(d) for d in kwargs.get("inside_at", ())],
        diseases={s: f["disease"].n_unique() for s, f in splits.items()},
        yes_share={s: float(f["label"].mean()) for s, f in splits.items()},
    )
