"""The original MoP release format (OpenKE style): import it, and export any of our graphs.

Files of a folder (formats in shared/notes/original-implementation.md):
- `entity2id.txt`, `relation2id.txt`: a count line, then `name<TAB>id`;
- `train2id.txt`: a count line, then `head tail relation` ids (tail BEFORE relation),
  separated by tabs or spaces;
- `partition_<K>.txt`: K lines, each the tab-separated entity ids of one partition;
- `entity2key.txt` (ours, ignored by OpenKE): a count line, then `key<TAB>id`, so that
  a graph keyed by CUIs keeps its keys through a round trip.

Without `entity2key.txt` an entity's key is its name when names are unique (as in the
authors' files, which were keyed by name), else its OpenKE id. Ids are re-assigned in
key order on import, as for every source; partitions are mapped through the keys.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mop.errors import MopError
from mop.io import atomic_dir
from mop.kg import KnowledgeGraph, from_coded, read_kg

ENTITY2ID = "entity2id.txt"
RELATION2ID = "relation2id.txt"
TRAIN2ID = "train2id.txt"
ENTITY2KEY = "entity2key.txt"


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MopError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raw = path.read_bytes()
        line = raw.count(b"\n", 0, exc.start) + 1
        raise MopError(f"{path}:{line}: not valid UTF-8") from None


def _count(path: Path, lines: list[str]) -> int:
    try:
        n = int(lines[0].strip())
    except (IndexError, ValueError):
        raise MopError(f"{path}:1: expected the number of lines that follow") from None
    if n != len(lines) - 1:
        raise MopError(f"{path}:1: says {n} lines follow, but {len(lines) - 1} do")
    return n


def read_id_file(path: Path) -> list[str]:
    """`name<TAB>id` lines -> names indexed by id (ids must be exactly 0..N-1)."""
    lines = _lines(path)
    n = _count(path, lines)
    names: list[str | None] = [None] * n
    for i, line in enumerate(lines[1:], start=2):
        name, tab, ident = line.rpartition("\t")
        if not tab:
            raise MopError(f"{path}:{i}: expected name<TAB>id")
        try:
            idx = int(ident)
        except ValueError:
            raise MopError(f"{path}:{i}: id {ident!r} is not an integer") from None
        if not 0 <= idx < n:
            raise MopError(f"{path}:{i}: id {idx} is outside 0..{n - 1}")
        if names[idx] is not None:
            raise MopError(f"{path}:{i}: id {idx} appears twice")
        if not name.strip():
            raise MopError(f"{path}:{i}: empty name")
        names[idx] = name
    return names  # type: ignore[return-value]


def read_train(path: Path, n_entities: int, n_relations: int) -> np.ndarray:
    """`h t r` lines -> an (N, 3) int array in (head, relation, tail) order.

    Parsed with polars (tens of millions of lines in seconds); when that fails, the
    lines are walked once to name the first bad one.
    """
    if not path.is_file():
        raise MopError(f"{path}: file not found")
    with path.open("rb") as fh:
        first, second = fh.readline(), fh.readline()
    try:
        n = int(first.strip())
    except ValueError:
        raise MopError(f"{path}:1: expected the number of lines that follow") from None
    arr = None
    with contextlib.suppress(pl.exceptions.PolarsError):
        df = pl.read_csv(
            path,
            skip_rows=1,
            has_header=False,
            separator="\t" if b"\t" in second else " ",
            schema={"h": pl.Int64, "t": pl.Int64, "r": pl.Int64},
            raise_if_empty=False,
        )
        if not any(df.null_count().row(0)):
            arr = df.to_numpy().astype(np.int64)
    if arr is None or arr.shape[1:] != (3,) or (arr.size and (arr < 0).any()):
        lines = _lines(path)
        for i, line in enumerate(lines[1:], start=2):
            parts = line.split()
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise MopError(f"{path}:{i}: expected three integer ids 'head tail relation'")
        raise MopError(f"{path}: cannot read the triples")
    if arr.shape[0] != n:
        raise MopError(f"{path}:1: says {n} lines follow, but {arr.shape[0]} do")
    for col, limit, what in (
        (0, n_entities, "head"),
        (1, n_entities, "tail"),
        (2, n_relations, "relation"),
    ):
        bad = (arr[:, col] < 0) | (arr[:, col] >= limit)
        if bad.any():
            i = int(np.argmax(bad))
            raise MopError(f"{path}:{i + 2}: {what} id {arr[i, col]} is outside 0..{limit - 1}")
    return arr[:, [0, 2, 1]]


def read_partition_file(path: Path, n_entities: int) -> np.ndarray:
    """`partition_K.txt` -> partition per OpenKE entity id (-1 where none is given)."""
    membership = np.full(n_entities, -1, dtype=np.int32)
    for part, line in enumerate(_lines(path)):
        for token in line.split():
            try:
                idx = int(token)
            except ValueError:
                raise MopError(f"{path}:{part + 1}: {token!r} is not an entity id") from None
            if not 0 <= idx < n_entities:
                raise MopError(f"{path}:{part + 1}: entity id {idx} is outside 0..{n_entities - 1}")
            if membership[idx] >= 0:
                raise MopError(
                    f"{path}:{part + 1}: entity {idx} is already in partition {membership[idx]}"
                )
            membership[idx] = part
    return membership


def _keys(root: Path, names: list[str]) -> tuple[list[str], str]:
    keys_file = root / ENTITY2KEY
    if keys_file.is_file():
        keys = read_id_file(keys_file)
        if len(keys) != len(names):
            raise MopError(f"{keys_file}:1: {len(keys)} keys for {len(names)} entities")
        return keys, "entity2key"
    if len(set(names)) == len(names):
        return names, "name"
    return [str(i) for i in range(len(names))], "openke id"


def load_openke(path: str | Path, *, key: str = "kgs.*") -> tuple[KnowledgeGraph, dict[str, Any]]:
    """Import an OpenKE folder (entity2id, relation2id, train2id) as a graph."""
    root = Path(path)
    if not root.is_dir():
        raise MopError(f"{root}: OpenKE folder not found (config key {key}.path)")
    names = read_id_file(root / ENTITY2ID)
    relations = read_id_file(root / RELATION2ID)
    hrt = read_train(root / TRAIN2ID, len(names), len(relations))
    keys, keyed_by = _keys(root, names)
    triples = pl.DataFrame(
        {
            "head": hrt[:, 0],
            "relation": pl.Series(relations, dtype=pl.String).gather(hrt[:, 1]),
            "tail": hrt[:, 2],
        }
    )
    entities = pl.DataFrame({"code": np.arange(len(names)), "key": keys, "name": names})
    kg = from_coded(entities, triples, source=str(root / TRAIN2ID))
    meta = {
        "source": "openke",
        "path": str(root),
        "keyed_by": keyed_by,
        "openke_triples": int(hrt.shape[0]),
        "duplicate_rows": int(hrt.shape[0]) - kg.triples.height,
        "partition_files": sorted(p.name for p in root.glob("partition_*.txt")),
    }
    return kg, meta


def import_partition(openke_dir: str | Path, k: int, kg_dir: str | Path) -> np.ndarray:
    """The authors' `partition_K.txt` as a membership over our graph's entity ids.

    Entities the file leaves out get -1; ids are mapped through the entity keys.
    """
    root = Path(openke_dir)
    names = read_id_file(root / ENTITY2ID)
    keys, _ = _keys(root, names)
    given = read_partition_file(root / f"partition_{k}.txt", len(names))
    ours = read_kg(kg_dir).entities
    position = dict(zip(keys, range(len(keys)), strict=True))
    membership = np.full(ours.height, -1, dtype=np.int32)
    for ident, entity_key in zip(ours["id"].to_list(), ours["key"].to_list(), strict=True):
        if entity_key in position:
            membership[ident] = given[position[entity_key]]
    return membership


def _write_id_file(path: Path, names: list[str], what: str) -> None:
    for i, name in enumerate(names):
        if "\t" in name or "\n" in name or "\r" in name:
            raise MopError(f"{what} {i} ({name!r}) holds a tab or newline; OpenKE cannot store it")
    with path.open("w", encoding="utf-8") as fh:
        fh.write(f"{len(names)}\n")
        fh.writelines(f"{name}\t{i}\n" for i, name in enumerate(names))


def export_openke(
    kg_dir: str | Path, out_dir: str | Path, partitions: list[str | Path] | None = None
) -> dict[str, Any]:
    """Write a KG folder (and partition folders of it) in the OpenKE layout, atomically."""
    kg = read_kg(kg_dir)
    written: dict[str, Any] = {"entities": kg.num_entities, "triples": kg.triples.height}
    with atomic_dir(out_dir) as tmp:
        _write_id_file(tmp / ENTITY2ID, kg.entities["name"].to_list(), "entity")
        _write_id_file(tmp / RELATION2ID, kg.relations["name"].to_list(), "relation")
        _write_id_file(tmp / ENTITY2KEY, kg.entities["key"].to_list(), "entity key")
        hrt = kg.triples.select("head", "tail", "relation")
        with (tmp / TRAIN2ID).open("wb") as fh:
            fh.write(f"{hrt.height}\n".encode())
            hrt.write_csv(fh, separator="\t", include_header=False)
        for part_dir in partitions or []:
            members = pl.read_parquet(Path(part_dir) / "membership.parquet")
            k = int(members["partition"].max()) + 1
            groups = members.sort("entity").group_by("partition", maintain_order=True).agg("entity")
            lines = dict(
                zip(groups["partition"].to_list(), groups["entity"].to_list(), strict=True)
            )
            with (tmp / f"partition_{k}.txt").open("w") as fh:
                fh.writelines("\t".join(map(str, lines.get(g, []))) + "\n" for g in range(k))
            written[f"partition_{k}"] = str(part_dir)
    return written
