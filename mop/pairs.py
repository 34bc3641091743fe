"""A tokenizer's own sentence-pair template, read off the tokenizer.

Pretraining builds `head + relation` examples from names tokenized once each (fast for
SNOMED-size graphs), so it cannot call the tokenizer on every pair; instead it asks the
tokenizer once how it lays out a pair - `[CLS] a [SEP] b [SEP]` for BERT, `<s> a </s></s>
b </s>` for RoBERTa and XLM-R - and which segment id each part gets, and assembles every
example the same way. Fine-tuning calls the tokenizer on its pairs, so both stages give
the same tokens for the same text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PairTemplate:
    """Special token ids around and between the two texts, and the segment id of each part:
    prefix, first text, middle, second text, suffix."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    types: tuple[int, int, int, int, int]

    @property
    def specials(self) -> int:
        """Special tokens a pair carries (BERT: 3, RoBERTa: 4)."""
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def ids(self, first: list[int], second: list[int]) -> list[int]:
        return [*self.prefix, *first, *self.middle, *second, *self.suffix]

    def type_ids(self, first: int, second: int) -> list[int]:
        """Segment ids of a pair whose texts have `first` and `second` tokens."""
        parts = (len(self.prefix), first, len(self.middle), second, len(self.suffix))
        return [t for n, t in zip(parts, self.types, strict=True) for _ in range(n)]


def pair_template(tokenizer: Any) -> PairTemplate:
    """The template of a fast tokenizer, from one probe pair: which tokens belong to
    neither text (its sequence ids are None) and where they sit. Segment ids are the
    tokenizer's where it gives them, else 0 up to the second text and 1 from there."""
    enc = tokenizer("a", "b")
    ids, seq = enc["input_ids"], enc.sequence_ids(0)
    first = [i for i, s in enumerate(seq) if s == 0]
    second = [i for i, s in enumerate(seq) if s == 1]
    if not first or not second or first[-1] > second[0]:
        raise ValueError(f"{type(tokenizer).__name__}: cannot read its sentence-pair template")
    types = enc.get("token_type_ids") or [int(i >= second[0]) for i in range(len(ids))]
    bounds = (0, first[0], first[-1] + 1, second[0], second[-1] + 1, len(ids))

    def part_type(p: int) -> int:
        start, end = bounds[p], bounds[p + 1]
        span = types[start:end]
        if not span:  # an empty part: the type of the part after it (before it at the end)
            return types[end] if end < len(types) else types[start - 1]
        if len(set(span)) > 1:
            raise ValueError(f"{type(tokenizer).__name__}: mixed segment ids in one part")
        return span[0]

    return PairTemplate(
        ids[: first[0]],
        ids[first[-1] + 1 : second[0]],
        ids[second[-1] + 1 :],
        tuple(part_type(p) for p in range(5)),  # type: ignore[arg-type]
    )
