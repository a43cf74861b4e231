"""Bad data and config that tests/test_data.py and tests/test_registry.py do not already cover.

Already covered there (not repeated here): missing / corrupt images, '..' and absolute image paths,
empty and blank ground truths, duplicate ids across files, malformed JSON rows, unknown row keys,
--skip-bad-rows logging and counting (test_data.py); registry key typos with "did you mean",
duplicate names and aliases, bad URLs, bad router trees, invalid JSON with line and column, a key
written where an env var name belongs (test_registry.py).
"""
import json
import os

import pytest
from PIL import Image

from data import DataError, load_samples
from registry import Registry, RegistryError
from scoring import is_correct


@pytest.fixture
def data_dir(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (6, 4), "red").save(images / "a.png")
    Image.new("RGB", (6, 4), "blue").save(tmp_path / "secret.png")  # outside the data directory
    os.symlink(tmp_path / "secret.png", images / "link.png")        # inside, but pointing out
    (images / "empty.png").write_bytes(b"")
    return tmp_path / "data"


def row(**changes):
    base = {"id": "1", "question": "How many?", "images": ["images/a.png"], "answer": "3", "data_source": "tallyqa"}
    return {**base, **changes}


def write(directory, rows, name="rows.jsonl"):
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("images, expected", [
    (["images/link.png"], "leaves the data directory"),        # a symlink is judged by its target
    (["images"], "could not be decoded"),                      # a directory
    (["."], "could not be decoded"),
    (["images/empty.png"], "could not be decoded"),            # zero bytes
    ("images/a.png", "images must be a list"),                 # a string, not a list
    ([""], "image path must be a non-empty string"),
    ([3], "image path must be a non-empty string"),
])
def test_bad_image_references_name_file_and_line(data_dir, images, expected):
    path = write(data_dir, [row(id="ok"), row(images=images)])
    with pytest.raises(DataError) as caught:
        load_samples(path)
    assert str(caught.value).startswith(f"{path} line 2: ") and expected in str(caught.value), caught.value


def test_nul_byte_in_image_path_is_a_row_error(data_dir):
    path = write(data_dir, [row(images=["images/a\x00.png"])])
    with pytest.raises(DataError, match="line 1"):
        load_samples(path)


def test_non_utf8_row_is_a_row_error_that_can_be_skipped(data_dir):
    path = data_dir / "bytes.jsonl"
    path.write_bytes(json.dumps(row()).encode() + b"\n\xff\xfe not utf-8\n")
    with pytest.raises(DataError, match="line 2"):
        load_samples(path)
    report = {}
    assert len(load_samples(path, skip_bad_rows=True, report=report)) == 1 and report["skipped"] == 1


def test_bad_parquet_rows_and_skipping_them(data_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def verl(index, images, ground_truth=("3",)):
        return {"data_source": "chartqa", "images": images,
                "reward_model": {"ground_truth": list(ground_truth), "style": "rule"},
                "extra_info": {"index": index, "question": "<image>What?", "answer": ["x"], "split": "train"}}

    png = (data_dir / "images" / "a.png").read_bytes()
    rows = [verl(1, [{"bytes": png, "path": None}]),
            verl(1, [{"bytes": png, "path": None}]),                          # duplicate id
            verl(3, [{"bytes": None, "path": "images/link.png"}]),            # symlink out
            verl(4, [{"bytes": None, "path": "images/missing.png"}]),
            verl(5, [{"bytes": png, "path": None}], ground_truth=[" "])]
    path = data_dir / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"{path} row 2: duplicate id '1' \(first seen at {path} row 1\)"):
        load_samples(path)
    report = {}
    assert [s.id for s in load_samples(path, skip_bad_rows=True, report=report)] == ["1"]
    assert report["skipped"] == 4
    assert [e.split(": ", 1)[0] for e in report["errors"]] == [f"{path} row {n}" for n in (2, 3, 4, 5)]
    assert "leaves the data directory" in report["errors"][1] and "not found" in report["errors"][2]
    assert "ground truth is empty" in report["errors"][3]


def test_unknown_data_source_loads_and_is_scored_by_the_generic_rule(data_dir):
    """Decision: data_source only selects a matching rule. An unknown source is accepted at load
    time and scored with the generic rule (numbers compared as numbers, text after normalization)
    -- not with a \\boxed{}-only fallback that can never match (upstream). The registry's oracle is
    keyed by family (else data source); eval reports its coverage, so an unknown source is visible
    there rather than refused at load time."""
    (sample,) = load_samples(write(data_dir, [row(data_source="my_new_benchmark", answer="1,200")]))
    assert sample.data_source == "my_new_benchmark"
    for answer, verdict in [("1200", True), ("1,200.0", True), ("The answer is 1200.", True), ("1201", False),
                            ("about 1200 apples or so", False)]:
        assert is_correct(answer, sample.ground_truths, sample.data_source) is verdict, answer
        assert is_correct(answer, sample.ground_truths, "tallyqa") is verdict  # same as any source without a rule
    # the special rules stay with their sources: chartqa's 5% tolerance is not applied elsewhere
    assert is_correct("1250", ("1200",), "chartqa") and not is_correct("1250", ("1200",), "my_new_benchmark")
    assert is_correct("B. a cat", ("B", "a cat"), "msearthmcq") and not is_correct("B. a cat", ("B", "a cat"), "my_new_benchmark")


@pytest.mark.parametrize("text, expected", [
    ("[]", "expected a JSON object, got list"),
    ("", "invalid JSON at line 1, column 1"),
    ("\ufeff{}", "invalid JSON at line 1, column 1"),              # a BOM: named, not a crash
    ('{"experts": ["Chart-R1"], "skills": []}', "experts[0]: expected a JSON object, got str"),
    ('{"experts": {}, "skills": []}', "'experts' must be a list of objects"),
    ('{"experts": [{"description": "d", "base_url": "http://h/v1"}], "skills": []}',
     "experts[0]: missing required key 'name'"),
])
def test_registry_shape_errors_name_the_file_and_entry(tmp_path, text, expected):
    path = tmp_path / "registry.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError) as caught:
        Registry.load(path)
    assert str(caught.value).startswith(str(path)) and expected in str(caught.value), caught.value


def test_empty_data_file_is_refused(data_dir):
    path = data_dir / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file holds no rows"):
        load_samples(path)
