import io
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
from data import DataError, Sample, load_samples
from maestro import system_prompt, user_prompt

UPSTREAM = Path(__file__).resolve().parents[1].parent / "shared" / "upstream-example"


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data directory with two real PNGs (one palette, one greyscale) and a corrupt file,
    next to a real image outside it that rows must not reach."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("P", (8, 6), color=3).save(images / "a.png")
    Image.new("L", (5, 4), color=200).save(images / "b.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tmp_path / "outside.png").write_bytes((images / "a.png").read_bytes())
    return tmp_path / "data"


def good_row(**changes) -> dict:
    row = {"id": "q1", "question": "How many dogs?", "images": ["images/a.png"], "answer": "3",
           "data_source": "tallyqa"}
    row.update(changes)
    return row


def write_jsonl(directory: Path, rows, name="data.jsonl") -> Path:
    path = directory / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_rows_load_with_decoded_rgb_images(data_dir):
    path = write_jsonl(data_dir, [
        good_row(),
        good_row(id=7, images=["images/b.png", "images/a.png"], answer=["B", "the second"],
                 family="counting", data_source="msearthmcq"),
        good_row(id="no-image", images=[], prompt=[{"role": "user", "content": "hi"}]),
    ])
    first, second, third = load_samples(path, use_stored_prompt=False)
    assert first == Sample("q1", "How many dogs?", first.images, ("3",), "tallyqa")
    assert first.images[0].mode == "RGB" and first.images[0].size == (8, 6)
    assert second.id == "7" and second.ground_truths == ("B", "the second")
    assert [im.size for im in second.images] == [(5, 4), (8, 6)]
    assert second.images[0].getpixel((0, 0)) == (200, 200, 200)
    assert second.family == "counting" and second.data_source == "msearthmcq"
    assert third.images == () and third.prompt is None  # the registry's prompt when asked
    stored = load_samples(path)[2]  # the stored prompt by default
    assert stored.prompt == ({"role": "user", "content": "hi"},)


def test_images_resolve_against_the_file_not_the_cwd(data_dir, monkeypatch, tmp_path_factory):
    path = write_jsonl(data_dir, [good_row()])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_samples(str(path))[0].images[0].size == (8, 6)


BAD_ROWS = {
    "malformed JSON": ('{"id": "x", "question": ', "malformed JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing question": (good_row(question=None), "question is missing or empty"),
    "blank question": (good_row(question="   "), "question is missing or empty"),
    "empty answer list": (good_row(answer=[]), "ground truth is empty"),
    "blank answers": (good_row(answer=["", "  "]), "ground truth is empty"),
    "numeric answer": (good_row(answer=3), "answer must be a string or a list of strings"),
    "missing data_source": ({k: v for k, v in good_row().items() if k != "data_source"},
                            "data_source is missing"),
    "missing id": ({k: v for k, v in good_row().items() if k != "id"}, "id must be"),
    "unknown key": (good_row(answers=["3"]), "unknown key(s) answers"),
    "missing image": (good_row(images=["images/nope.png"]), "image 'images/nope.png'"),
    "corrupt image": (good_row(images=["images/corrupt.png"]), "could not be decoded"),
    "parent escape": (good_row(images=["../outside.png"]), "leaves the data directory"),
    "sneaky escape": (good_row(images=["images/../../outside.png"]), "leaves the data directory"),
    "absolute path": (good_row(images=["/etc/hostname"]), "leaves the data directory"),
    "prompt without its image": (good_row(prompt=[{"role": "user", "content": "How many dogs?"}]),
                                 "prompt has 0 <image> markers but the row has 1 images"),
    "prompt content not text": (good_row(prompt=[{"role": "user", "content": 7}]), "each content a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_jsonl_row_names_file_and_line(data_dir, case):
    row, expected = BAD_ROWS[case]
    path = write_jsonl(data_dir, [good_row(id="ok"), "", row])  # the bad row is on line 3
    with pytest.raises(DataError) as caught:
        load_samples(path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 3: ") and expected in message, message


def test_duplicate_ids_are_refused_across_files(data_dir):
    first = write_jsonl(data_dir, [good_row(id=5)], "first.jsonl")
    second = write_jsonl(data_dir, [good_row(id="5")], "second.jsonl")
    with pytest.raises(DataError, match=rf"{second} line 1: duplicate id '5' \(first seen at {first} line 1\)"):
        load_samples([first, second])


def test_skip_bad_rows_logs_and_counts(data_dir, caplog):
    path = write_jsonl(data_dir, [good_row(id="a"), good_row(id="b", answer=[]), "{oops",
                                  good_row(id="a"), good_row(id="c")])
    report = {}
    with caplog.at_level(logging.WARNING, logger="data"):
        samples = load_samples(path, skip_bad_rows=True, report=report)
    assert [s.id for s in samples] == ["a", "c"]
    assert report["loaded"] == 2 and report["skipped"] == 3
    assert [e.split(": ")[0] for e in report["errors"]] == [f"{path} line {n}" for n in (2, 3, 4)]
    assert len(caplog.records) == 3 and "line 2" in caplog.records[0].getMessage()


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_samples(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("id,question\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_samples(tmp_path / "data.csv")


def verl_row(index, question, ground_truth, image, **extra) -> dict:
    row = {"data_source": "chartqa",
           "prompt": [{"role": "system", "content": "route"}, {"role": "user", "content": "<image>q"}],
           "images": [image],
           "reward_model": {"ground_truth": ground_truth, "style": "rule"},
           "extra_info": {"answer": ["LEAKED-ANSWER"], "index": index, "question": question,
                          "split": "train"}}
    row.update(extra)
    return row


def write_parquet(path: Path, rows) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_bytes_paths_and_no_answer_leak(data_dir):
    png = (data_dir / "images" / "b.png").read_bytes()
    path = write_parquet(data_dir / "rows.parquet", [
        verl_row(1, "<image>What is shown?", ["A", "B"], {"bytes": png, "path": "ignored.png"}),
        verl_row(2, "<image><image> Compare them.", ["x"], {"bytes": None, "path": "images/a.png"}),
    ])
    first, second = load_samples(path, use_stored_prompt=False)
    assert (first.id, first.question, first.ground_truths) == ("1", "What is shown?", ("A", "B"))
    assert first.images[0].size == (5, 4) and first.images[0].mode == "RGB"
    assert (second.question, second.images[0].size) == ("Compare them.", (8, 6))
    assert first.prompt is None
    for sample in load_samples(path):
        assert sample.prompt[0] == {"role": "system", "content": "route"}
        assert "LEAKED-ANSWER" not in repr(sample)


@pytest.mark.parametrize("change, expected", [
    (dict(reward_model={"ground_truth": [], "style": "rule"}), "ground truth is empty"),
    (dict(images=[{"bytes": None, "path": "../outside.png"}]), "leaves the data directory"),
    (dict(images=[{"bytes": b"not an image", "path": None}]), "image 1 (embedded bytes) could not be decoded"),
    (dict(data_source=""), "data_source is missing"),
    (dict(prompt=[{"role": "system", "content": "route"}, {"role": "user", "content": "<image><image>q"}]),
     "prompt has 2 <image> markers but the row has 1 images"),
])
def test_bad_verl_row_names_file_and_row(data_dir, change, expected):
    good = verl_row(1, "<image>Fine?", ["yes"], {"bytes": None, "path": "images/a.png"})
    bad = verl_row(2, "<image>Bad?", ["no"], {"bytes": None, "path": "images/a.png"}, **change)
    path = write_parquet(data_dir / "rows.parquet", [good, bad])
    with pytest.raises(DataError) as caught:
        load_samples(path)
    assert str(caught.value).startswith(f"{path} row 2: ") and expected in str(caught.value)


def test_verl_question_that_is_only_a_placeholder(data_dir):
    path = write_parquet(data_dir / "rows.parquet",
                         [verl_row(1, "<image>", ["x"], {"bytes": None, "path": "images/a.png"})])
    with pytest.raises(DataError, match="row 1: extra_info.question is missing or empty"):
        load_samples(path)


def test_upstream_example_rows():
    pytest.importorskip("pyarrow")
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream example rows not present at {UPSTREAM}")
    train, val = load_samples([UPSTREAM / "train_data_example.parquet",
                               UPSTREAM / "val_data_example.parquet"], use_stored_prompt=False)
    assert train.question == "What ride-hailing start-up had 88 percent growth in 2019?"
    assert train.ground_truths == ("Go-Jek",) and train.data_source == "chartqa"
    assert train.id == "2511" and len(train.images) == 1 and train.images[0].mode == "RGB"
    assert val.question == "Who ranked second in the IAAF ranking as of December 2020?"
    assert val.ground_truths == ("Tania Vicenzino",) and val.id == "1691"
    assert train.prompt is None
    stored = load_samples(UPSTREAM / "train_data_example.parquet")[0]
    assert [m["role"] for m in stored.prompt] == ["system", "user"]


def test_upstream_rows_first_turn_is_the_stored_prompt_token_for_token(tiny_dir):
    """The policy's first-turn input for each upstream example row is the chat template applied to
    the row's own stored messages, "<image>" expanded to the image's placeholder tokens."""
    pytest.importorskip("pyarrow")
    if not UPSTREAM.is_dir():
        pytest.skip(f"upstream example rows not present at {UPSTREAM}")
    from policy import build_prompt, load_policy
    from registry import Registry
    _, processor = load_policy(tiny_dir)
    registry = Registry.load(Path(__file__).resolve().parents[1] / "configs" / "paper.json")
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    samples = load_samples([UPSTREAM / "train_data_example.parquet", UPSTREAM / "val_data_example.parquet"])
    for sample in samples:
        grid = image_processor(images=list(sample.images), return_tensors="pt")["image_grid_thw"]
        placeholder = ("<|vision_start|>" + "<|image_pad|>" * (int(grid[0].prod()) // image_processor.merge_size ** 2)
                       + "<|vision_end|>")
        messages = [{"role": m["role"], "content": m["content"].replace("<image>", placeholder)} for m in sample.prompt]
        text = tokenizer.apply_chat_template(messages, chat_template=processor.chat_template,
                                             add_generation_prompt=True, tokenize=False)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert build_prompt(processor, registry, sample)["input_ids"][0].tolist() == expected, sample.id
        assert sample.prompt[0]["content"].lstrip().startswith("You are a router and planner")
        assert len(expected) > 1000  # upstream's long planner prompt, not our registry's


def test_upstream_protocol_resizes_images_as_upstreams_loader(tiny_dir, data_dir):
    """Under protocol 'upstream' the policy sees each image as upstream's loader resized it (both
    sides to multiples of 28, area in [4, 16384] x 28^2; sizes here as qwen_vl_utils 0.0.14's
    fetch_image gives them, checked pixel for pixel against it) before the processor's own resize;
    an RGBA image lies over white, as there."""
    from policy import build_prompt, load_policy, upstream_image
    from registry import Registry
    for size, resized in [((800, 557), (812, 560)),      # round(28.57) = 29, round(19.89) = 20 sides of 28
                          ((10, 10), (56, 56)),          # below 4 x 28^2: scaled up to it, sides rounded up
                          ((4000, 4000), (3584, 3584)),  # above 16384 x 28^2: scaled down, sides rounded down
                          ((2000, 10), (1988, 28))]:     # a side never below 28
        assert upstream_image(Image.new("RGB", size)).size == resized
    _, processor = load_policy(tiny_dir)
    registry = Registry.load(Path(__file__).resolve().parents[1] / "configs" / "paper.json")
    image = Image.linear_gradient("L").convert("RGB").resize((800, 557))
    sample = Sample("s", "What is shown?", (image,), ("x",), "chartqa")
    ours, upstream = (build_prompt(processor, registry, sample, protocol) for protocol in ("ours", "upstream"))
    expected = processor.image_processor(images=[image.resize((812, 560), Image.Resampling.BICUBIC)], return_tensors="pt")
    assert torch.equal(upstream["image_grid_thw"], expected["image_grid_thw"])
    assert torch.equal(upstream["pixel_values"], expected["pixel_values"])
    assert not torch.equal(ours["pixel_values"], upstream["pixel_values"])  # and the cache keeps them apart

    transparent = Image.new("RGBA", (4, 3), (0, 0, 0, 0))
    transparent.putpixel((0, 0), (255, 0, 0, 255))
    transparent.save(data_dir / "images" / "rgba.png")
    [loaded] = load_samples(write_jsonl(data_dir, [good_row(images=["images/rgba.png"])])).pop().images
    assert loaded.getpixel((0, 0)) == (255, 0, 0) and loaded.getpixel((1, 1)) == (255, 255, 255)


# ---- data.py prepare: one tiny fixture per benchmark's release format

def png_bytes(color, size=(6, 5)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def release_fixture(source, root: Path):
    """(input path, image root or None, [(expected question start, expected ground truths)]) of a
    two-row release file of `source`, written in that benchmark's public format."""
    def image_file(relative, color):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(png_bytes(color))
        return relative

    root.mkdir(parents=True, exist_ok=True)
    if source == "chartqa":  # ChartQA Dataset/test/test_human.json + png/
        image_file("png/a.png", "red"), image_file("png/b.png", "blue")
        path = root / "test_human.json"
        path.write_text(json.dumps([{"imgname": "a.png", "query": "Which year peaked?", "label": "2019"},
                                    {"imgname": "b.png", "query": "What is the value?", "label": "12.5"}]))
        return path, None, [("Which year peaked?", ("2019",)), ("What is the value?", ("12.5",))]
    if source == "geometry3k":  # InterGPS data/geometry3k/test/<id>/{data.json, img_diagram.png}
        for number, (letter, color) in enumerate([("B", "red"), ("D", "blue")]):
            image_file(f"{number}/img_diagram.png", color)
            (root / str(number) / "data.json").write_text(json.dumps(
                {"id": number, "problem_text": f"Find x in figure {number}.", "choices": ["1", "2", "3", "4"],
                 "answer": letter}))
        return root, None, [("Find x in figure 0.", ("2",)), ("Find x in figure 1.", ("4",))]
    if source == "tallyqa":  # test.json with paths relative to the VG / COCO root
        image_file("VG_100K/1.jpg", "red"), image_file("val2014/2.jpg", "blue")
        path = root / "test.json"
        path.write_text(json.dumps([
            {"image": "VG_100K/1.jpg", "question": "How many dogs?", "answer": 3, "question_id": 11, "issimple": True},
            {"image": "val2014/2.jpg", "question": "How many cats?", "answer": 0, "question_id": 12, "issimple": False}]))
        return path, root, [("How many dogs?", ("3",)), ("How many cats?", ("0",))]
    if source == "msearthmcq":  # MSEarth_MCQ parquet: query with options, response "B. text", image
        query = "<image>Caption: a map\nQuestion:\nWhich rock?\nOptions:\nA. basalt\nB. granite\nC. shale"
        path = write_parquet(root / "mcq.parquet", [
            {"query": query, "response": "B. granite", "image": {"bytes": png_bytes("red"), "path": None}},
            {"query": query.replace("Which rock?", "Which one?"), "response": "C. shale",
             "image": {"bytes": png_bytes("blue"), "path": None}}])
        return path, None, [("Caption: a map", ("B", "granite")), ("Caption: a map", ("C", "shale"))]
    if source == "microvqa":  # jmhb/microvqa parquet: images_list, question, choices, correct_index
        path = write_parquet(root / "microvqa.parquet", [
            {"key_question": "q1", "question": "Which organelle?", "choices": ["nucleus", "mitochondrion"],
             "correct_index": 1, "images_list": [{"bytes": png_bytes("red"), "path": None}]},
            {"key_question": "q2", "question": "Which stain?", "choices": ["DAPI", "GFP", "none"],
             "correct_index": 0, "images_list": [{"bytes": png_bytes("blue"), "path": None}]}])
        return path, None, [("Which organelle?\nA. nucleus\nB. mitochondrion", ("B", "mitochondrion")),
                            ("Which stain?", ("A", "DAPI"))]
    if source == "slake":  # SLAKE test.json + imgs/xmlabN/source.jpg; English rows only
        image_file("imgs/xmlab1/source.jpg", "red"), image_file("imgs/xmlab2/source.jpg", "blue")
        path = root / "test.json"
        path.write_text(json.dumps([
            {"qid": 1, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes", "q_lang": "en"},
            {"qid": 2, "img_name": "xmlab1/source.jpg", "question": "这是CT吗?", "answer": "是", "q_lang": "zh"},
            {"qid": 3, "img_name": "xmlab2/source.jpg", "question": "Which organ?", "answer": "Liver", "q_lang": "en"}]))
        return path, None, [("Is this a CT?", ("Yes",)), ("Which organ?", ("Liver",))]
    if source == "vstar":  # vstar_bench test_questions.jsonl: image, text with (A) options, label
        image_file("direct_attributes/1.jpg", "red"), image_file("relative_position/2.jpg", "blue")
        path = root / "test_questions.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in [
            {"image": "direct_attributes/1.jpg", "text": "What colour is the cup?\n(A) red\n(B) blue", "label": "A",
             "question_id": 0, "category": "direct_attributes"},
            {"image": "relative_position/2.jpg", "text": "Is the dog left of the cat?\n(A) yes\n(B) no", "label": "B",
             "question_id": 1, "category": "relative_position"}]) + "\n")
        return path, None, [("What colour is the cup?", ("A", "red")), ("Is the dog left of the cat?", ("B", "no"))]
    assert source == "zwz"  # ZoomBench parquet: image bytes, prompt, answer (a letter or open-ended)
    path = write_parquet(root / "zoombench.parquet", [
        {"image": {"bytes": png_bytes("red"), "path": None}, "prompt": "What is written?\n(A) EXIT\n(B) STOP",
         "answer": "B"},
        {"image": {"bytes": png_bytes("blue"), "path": None}, "prompt": "What number is on the bus?", "answer": "42"}])
    return path, None, [("What is written?", ("B", "STOP")), ("What number is on the bus?", ("42",))]


@pytest.mark.parametrize("source", sorted(data.PREPARE))
def test_prepare_each_release_format(source, tmp_path):
    pytest.importorskip("pyarrow")
    from registry import Registry
    registry = Registry.load(Path(__file__).resolve().parents[1] / "configs" / "paper.json")
    path, image_root, expected = release_fixture(source, tmp_path / "release")
    out = tmp_path / "out" / f"{source}.parquet"
    report = data.main(["prepare", source, "--input", str(path), "--out", str(out),
                        *(["--image-root", str(image_root)] if image_root else [])])
    assert report["written"] == 2 and report["skipped"] == 0
    assert report["filtered"] == (1 if source == "slake" else 0)  # the Chinese SLAKE row
    samples = load_samples(out)
    assert [(s.question[:len(q)], s.ground_truths) for s, (q, _) in zip(samples, expected)] == \
           [(q, truths) for q, truths in expected]
    assert all(s.data_source == source and len(s.images) == 1 for s in samples)
    colours = [s.images[0].getpixel((0, 0)) for s in samples]
    assert colours == [(255, 0, 0), (0, 0, 255)]  # the right image travelled with each row, embedded
    for sample in samples:  # our stored prompt, rendered from the registry, with the image marker
        assert sample.prompt[0]["content"] == system_prompt(registry)
        assert sample.prompt[1]["content"] == "<image>" + user_prompt(registry, sample.question)


def test_prepare_can_give_every_row_the_prompt_of_a_verl_row(tmp_path):
    """--prompt-from: the system message and user suffix a checkpoint was trained with (upstream's
    example row when ../shared has it, else a hand-made verl row), around each question."""
    pytest.importorskip("pyarrow")
    template = UPSTREAM / "val_data_example.parquet"
    if not template.exists():
        template = tmp_path / "row.jsonl"
        template.write_text(json.dumps({"prompt": [{"role": "system", "content": "ROUTE WELL"},
                                                   {"role": "user", "content": "<image>Q0?\n\nPLAN BRIEFLY"}],
                                        "extra_info": {"question": "<image>Q0?"}}) + "\n")
    system, suffix = data.prompt_of_row(template)
    path, _, expected = release_fixture("zwz", tmp_path / "release")
    out = tmp_path / "zwz.parquet"
    data.main(["prepare", "zwz", "--input", str(path), "--out", str(out), "--prompt-from", str(template)])
    samples = load_samples(out)
    assert system.strip() and suffix.strip() and [s.question[:len(q)] for s, (q, _) in zip(samples, expected)] == [
        q for q, _ in expected]
    for sample in samples:
        assert list(sample.prompt) == [{"role": "system", "content": system},
                                 {"role": "user", "content": "<image>" + sample.question + suffix}]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(SystemExit, match=r"broken.jsonl line 1: expected a verl row with a \[system, user\] prompt"):
        data.main(["prepare", "zwz", "--input", str(path), "--out", str(out), "--prompt-from", str(broken)])


def test_prepare_bad_rows_name_file_and_row_or_are_counted(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    path, _, _ = release_fixture("vstar", tmp_path)
    with path.open("a") as f:
        f.write(json.dumps({"image": "direct_attributes/1.jpg", "text": "Q?\n(A) x\n(B) y", "label": "C"}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"image": "../outside.jpg", "text": "Q?\n(A) x", "label": "A"}) + "\n")
    args = ["prepare", "vstar", "--input", str(path), "--out", str(tmp_path / "v.parquet")]
    with pytest.raises(SystemExit, match=r"test_questions.jsonl line 3: answer 'C' is not among the options"):
        data.main(args)
    report = data.main(args + ["--skip-bad-rows"])
    assert (report["read"], report["written"], report["skipped"]) == (5, 2, 3)
    printed = capsys.readouterr().out
    assert "line 4: " in printed and "line 5: image path '../outside.jpg' leaves the data directory" in printed
    assert "read 5, written 2" in printed and "skipped 3 bad" in printed


def test_prepare_names_the_row_of_a_number_where_text_belongs(tmp_path):
    pytest.importorskip("pyarrow")
    path = write_parquet(tmp_path / "mcq.parquet", [  # response 2 where "B. granite" belongs: .strip() fails
        {"query": "Which rock?\nA. basalt\nB. granite", "response": 2, "image": {"bytes": png_bytes("red"), "path": None}}])
    args = ["prepare", "msearthmcq", "--input", str(path), "--out", str(tmp_path / "m.parquet")]
    with pytest.raises(SystemExit, match=r"mcq.parquet row 1: response must be text like 'B. granite', got 2"):
        data.main(args)
    with pytest.raises(SystemExit, match=r"no row could be converted \(1 bad"):
        data.main(args + ["--skip-bad-rows"])


def test_prepare_names_a_broken_input_or_registry_file(tmp_path):
    pytest.importorskip("pyarrow")
    broken = tmp_path / "test.json"
    broken.write_text("[\n{not json")
    out = ["--out", str(tmp_path / "x.parquet")]
    with pytest.raises(SystemExit, match=r"data.py: .*test.json: invalid JSON"):
        data.main(["prepare", "chartqa", "--input", str(broken), *out])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit, match=r"data.py: .*bad.parquet: cannot read as parquet"):
        data.main(["prepare", "zwz", "--input", str(tmp_path / "bad.parquet"), *out])
    with pytest.raises(SystemExit, match=r"data.py: cannot read registry file .*nowhere.json"):
        data.main(["prepare", "chartqa", "--input", str(broken), "--registry", str(tmp_path / "nowhere.json"), *out])
