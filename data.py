"""Samples: one question with its images and ground truths, read from JSONL or verl parquet.

Everything is checked and every image decoded when the file is loaded, so a bad row stops the run
before training starts, with the file and row in the message -- not as a missing image deep
inside a skill call.

JSONL, one object per line (image paths relative to the JSONL file's own directory):
    {"id": "7", "question": "How many dogs?", "images": ["img/7.png"], "answer": "3",
     "data_source": "tallyqa", "family": "counting", "prompt": [{"role": ..., "content": ...}]}
  id, question, answer (a string or a list of strings) and data_source are required; a scorer is
  chosen by data_source, so it is never guessed from the file name. images, family and prompt are
  optional.

verl parquet (the upstream Maestro format): the question is extra_info.question without its
leading <image> placeholder, the id is extra_info.index, ground truths are
reward_model.ground_truth, images are embedded bytes (or else paths relative to the parquet
file). extra_info.answer is never read: the ground truth has exactly one way into a Sample.
"""
import io
import json
import logging
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from maestro import system_prompt, user_prompt
from registry import draw_view, view_ids

logger = logging.getLogger(__name__)


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    id: str
    question: str
    images: tuple                    # tuple[PIL.Image.Image], RGB, decoded at load time
    ground_truths: tuple[str, ...]
    data_source: str                 # selects the scorer
    family: str | None = None        # for oracle routing, optional
    prompt: tuple | None = None      # stored chat messages (dropped with use_stored_prompt=False)
    registry: object = None          # its own registry view (registry.draw_view), None: the environment's


_JSONL_KEYS = {"id", "question", "images", "answer", "data_source", "family", "prompt"}
_LEADING_IMAGE_PLACEHOLDERS = re.compile(r"^(\s*<image>)+\s*")


class _BadRow(Exception):
    """What is wrong with one row; turned into a DataError naming the file and row."""


def _decode_image(data: bytes | None, path: Path | None, label: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
            if image.mode == "RGBA":  # over white, as upstream's loader (qwen_vl_utils' to_rgb) puts it
                return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
            return image.convert("RGB")
    except FileNotFoundError:
        raise _BadRow(f"image {label} not found") from None
    except Exception as error:  # PIL raises several types for truncated or non-image files
        raise _BadRow(f"image {label} could not be decoded: {error}") from None


def _image_from_path(relative: str, base_dir: Path) -> Image.Image:
    """Decode an image given relative to base_dir; paths leaving base_dir are refused."""
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise _BadRow(f"image path must be a non-empty string without NUL bytes, got {json.dumps(relative)}")
    resolved = (base_dir / relative).resolve()
    if Path(relative).is_absolute() or not resolved.is_relative_to(base_dir.resolve()):
        raise _BadRow(f"image path '{relative}' leaves the data directory {base_dir}; "
                      "image paths must be relative and stay inside it")
    return _decode_image(None, resolved, f"'{relative}' ({resolved})")


def _ground_truths(answer) -> tuple[str, ...]:
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
        raise _BadRow(f"answer must be a string or a list of strings, got {json.dumps(answer)}")
    if not answers or any(not a.strip() for a in answers):
        raise _BadRow(f"ground truth is empty or has a blank entry: {json.dumps(answers)}")
    return tuple(answers)


def _required_string(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(f"{what} is missing or empty")
    return value


def _stored_prompt(prompt, num_images: int) -> tuple:
    """A row's stored prompt messages; its images (<image> markers in string contents, image parts
    in part lists) must be the row's, one for one (policy.chat_messages puts them there)."""
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content"), (str, list)) for m in prompt):
        raise _BadRow("prompt must be a list of {role, content} messages, each content a string or a list of parts")
    markers = sum(m["content"].count("<image>") if isinstance(m["content"], str) else
                  sum(isinstance(part, dict) and part.get("type") == "image" for part in m["content"])
                  for m in prompt)
    if markers != num_images:
        raise _BadRow(f"prompt has {markers} <image> markers but the row has {num_images} images")
    return tuple({"role": m["role"], "content": m["content"]} for m in prompt)


def _sample_from_json(line: bytes, base_dir: Path, use_stored_prompt: bool) -> Sample:
    try:
        line = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _BadRow(f"not UTF-8 text (byte {error.start}): {error.reason}") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise _BadRow(f"malformed JSON at column {error.colno}: {error.msg}") from None
    if not isinstance(row, dict):
        raise _BadRow("expected a JSON object")
    unknown = sorted(set(row) - _JSONL_KEYS)
    if unknown:
        raise _BadRow(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_JSONL_KEYS))}")
    sample_id = row.get("id")
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or str(sample_id).strip() == "":
        raise _BadRow(f"id must be a non-empty string or an integer, got {json.dumps(sample_id)}")
    question = _required_string(row.get("question"), "question")
    ground_truths = _ground_truths(row.get("answer"))
    data_source = _required_string(row.get("data_source"), "data_source")
    family = row.get("family")
    if family is not None and not isinstance(family, str):
        raise _BadRow(f"family must be a string, got {json.dumps(family)}")
    paths = row.get("images", [])
    if not isinstance(paths, list):
        raise _BadRow("images must be a list of relative paths")
    images = tuple(_image_from_path(p, base_dir) for p in paths)
    prompt = _stored_prompt(row["prompt"], len(images)) if use_stored_prompt and "prompt" in row else None
    return Sample(str(sample_id), question, images, ground_truths, data_source, family, prompt)


def _sample_from_verl(row: dict, base_dir: Path, use_stored_prompt: bool) -> Sample:
    extra = row.get("extra_info")
    if not isinstance(extra, dict):
        raise _BadRow("extra_info is missing")
    if extra.get("index") is None:
        raise _BadRow("extra_info.index (the sample id) is missing")
    question = _required_string(extra.get("question"), "extra_info.question")
    question = _required_string(_LEADING_IMAGE_PLACEHOLDERS.sub("", question), "extra_info.question")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise _BadRow("reward_model.ground_truth is missing")
    ground_truths = _ground_truths(reward_model["ground_truth"])
    data_source = _required_string(row.get("data_source"), "data_source")
    images = []
    for position, item in enumerate(row.get("images") or [], start=1):
        if not isinstance(item, dict):
            raise _BadRow(f"images[{position}] must be a {{bytes, path}} struct")
        if item.get("bytes"):
            images.append(_decode_image(item["bytes"], None, f"{position} (embedded bytes)"))
        else:
            images.append(_image_from_path(item.get("path"), base_dir))
    prompt = _stored_prompt(row["prompt"], len(images)) if use_stored_prompt and row.get("prompt") is not None else None
    return Sample(str(extra["index"]), question, tuple(images), ground_truths, data_source,
                  row.get("family"), prompt)


def _read_rows(path: Path):
    """Yield (row label, parse function argument, parser) for every row of one file."""
    if path.suffix == ".jsonl":
        with path.open("rb") as lines:  # decoded per row, so one bad row names its line
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"line {number}", line, _sample_from_json
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install 'pyarrow>=14' "
                              "(or the project's 'parquet' extra)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:
            raise DataError(f"{path}: not a readable parquet file: {error}") from None
        for number, row in enumerate(rows, start=1):
            yield f"row {number}", row, _sample_from_verl
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected .jsonl or .parquet")


def load_samples(paths, *, skip_bad_rows=False, use_stored_prompt=True, report=None) -> list[Sample]:
    """Load and fully check samples from one path or a list of .jsonl / .parquet paths.

    A bad row raises DataError naming the file, the row (1-based line for JSONL, row for parquet)
    and the problem. With skip_bad_rows=True each bad row is logged as a warning and skipped
    instead. Pass a dict as report to receive {"loaded": int, "skipped": int, "errors": [str]}.
    Ids must be unique across everything loaded in one call. A row's stored prompt (the verl
    `prompt` column, a JSONL row's `prompt`: the messages a checkpoint was trained with) is kept
    unless use_stored_prompt=False, which makes the policy see the registry's prompt instead.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    samples, errors, seen = [], [], {}
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        rows_in_file = 0
        for label, raw, parse in _read_rows(path):
            rows_in_file += 1
            where = f"{path} {label}"
            try:
                sample = parse(raw, path.parent, use_stored_prompt)
                if sample.id in seen:
                    raise _BadRow(f"duplicate id '{sample.id}' (first seen at {seen[sample.id]})")
            except _BadRow as problem:
                message = f"{where}: {problem}"
                if not skip_bad_rows:
                    raise DataError(message) from None
                logger.warning("skipping bad row: %s", message)
                errors.append(message)
                continue
            seen[sample.id] = where
            samples.append(sample)
        if rows_in_file == 0:
            raise DataError(f"{path}: the file holds no rows; expected one sample per line (JSONL) or row (parquet)")
    if report is not None:
        report.update(loaded=len(samples), skipped=len(errors), errors=errors)
    return samples


# ---------------------------------------------------------------------------------------------
# Preparing the paper's benchmarks: python data.py prepare SOURCE --input PATH --out FILE.parquet
#
# Each reader takes a benchmark's public release file as downloaded and yields, per row, a label
# and a converter; a converter returns (id, question, images [(bytes or None, path or None)],
# ground truths) or raises _BadRow. Multiple-choice ground truths are [letter, option text].

LETTERS = "ABCDEFGHIJ"
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.)]\s*(.+?)\s*$", re.M)


def _option_text(text: str, letter: str) -> str:
    """The text of option `letter` listed in `text` as "(A) red" or "A. red" lines."""
    options = {found.group(1): found.group(2) for found in _OPTION_LINE.finditer(text)}
    if letter not in options:
        raise _BadRow(f"answer '{letter}' is not among the options listed in the question ({sorted(options)})")
    return options[letter]


def _image_struct(item, what: str):
    """An HF parquet image ({bytes, path}) or a path string -> (bytes or None, path or None)."""
    if isinstance(item, dict) and item.get("bytes"):
        return item["bytes"], None
    if isinstance(item, dict) and item.get("path"):
        return None, item["path"]
    if isinstance(item, str) and item.strip():
        return None, item
    raise _BadRow(f"{what} holds no image bytes or path")


def _rows_of(path: Path):
    """The records of a .json (a list), .jsonl (raw lines, parsed per row) or .parquet file, as (label, record)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow's errors share no base class
            raise DataError(f"{path}: cannot read as parquet: {error}") from None
        return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]
    if path.suffix == ".jsonl":
        return [(f"line {i}", line) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return [(f"record {i}", row) for i, row in enumerate(records, start=1)]


def _need(row, *keys):
    missing = [k for k in keys if not isinstance(row, dict) or row.get(k) in (None, "")]
    if missing:
        raise _BadRow(f"missing field(s) {', '.join(missing)}")
    return [row[k] for k in keys]


def _chartqa(row, i):  # ChartQA json {imgname, query, label} (images in png/ beside it) or HF parquet
    if "imgname" in row:
        name, query, label = _need(row, "imgname", "query", "label")
        return f"{Path(name).stem}-{i}", query, [(None, f"png/{name}")], [str(label)]
    image, query, label = _need(row, "image", "query", "label")
    return str(i), query, [_image_struct(image, "image")], [str(x) for x in (label if isinstance(label, list) else [label])]


def _geometry3k(row, i):  # InterGPS <id>/data.json rows (read by _intergps) or hiyouga/geometry3k parquet
    if "problem_text" in row:
        text, choices, letter = _need(row, "problem_text", "choices", "answer")
        if letter not in LETTERS[:len(choices)]:
            raise _BadRow(f"answer '{letter}' is not one of the {len(choices)} choice letters")
        return str(row.get("id", i)), text, [(None, row["_image"])], [str(choices[LETTERS.index(letter)])]
    images, problem, answer = _need(row, "images", "problem", "answer")
    return str(row.get("id", i)), problem, [_image_struct(im, "images") for im in images], [str(answer)]


def _tallyqa(row, i):  # TallyQA train.json / test.json; images relative to --image-root (VG / COCO)
    image, question, answer = _need(row, "image", "question", "answer")
    return str(row.get("question_id", i)), question, [(None, image)], [str(answer)]


def _msearthmcq(row, i):  # MSEarth_MCQ parquet: query (caption, question, options), response "B. text"
    query, response, image = _need(row, "query", "response", "image")
    if not isinstance(response, str):
        raise _BadRow(f"response must be text like 'B. granite', got {response!r}")
    letter = response.strip()[:1]
    if letter not in LETTERS:
        raise _BadRow(f"response {response[:40]!r} does not start with an option letter")
    images = image if isinstance(image, list) else [image]
    return str(row.get("question_id", i)), query, [_image_struct(im, "image") for im in images], \
        [letter, _option_text(query, letter)]


def _microvqa(row, i):  # MicroVQA parquet: images_list, question, choices, correct_index (0-based)
    images, question, choices = _need(row, "images_list", "question", "choices")
    index = row.get("correct_index")
    if not isinstance(index, int) or not 0 <= index < len(choices):
        raise _BadRow(f"correct_index {index!r} is not an index into {len(choices)} choices")
    listed = question + "\n" + "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(choices))
    return str(row.get("key_question", i)), listed, [_image_struct(im, "images_list") for im in images], \
        [LETTERS[index], str(choices[index])]


def _slake(row, i):  # SLAKE train/validation/test.json: img_name (under imgs/), question, answer, q_lang
    name, question, answer = _need(row, "img_name", "question", "answer")
    return str(row.get("qid", i)), question, [(None, f"imgs/{name}")], [str(answer)]


def _vstar(row, i):  # V* test_questions.jsonl: image, text (question with "(A) .." options), label (letter)
    image, text, label = _need(row, "image", "text", "label")
    return str(row.get("question_id", i)), text, [(None, image)], [label, _option_text(text, label)]


def _zwz(row, i):  # ZoomBench parquet (image, prompt, answer) or ZwZ-RL-VQA (images, problem, answer)
    question = row.get("prompt") or row.get("problem")
    images = [row["image"]] if row.get("image") else row.get("images") or []
    if not question or not images or row.get("answer") in (None, ""):
        raise _BadRow("expected prompt or problem, image or images, and answer")
    answer = str(row["answer"]).strip()
    truths = [answer, _option_text(question, answer)] if len(answer) == 1 and answer in LETTERS else [answer]
    return str(row.get("id", i)), question, [_image_struct(im, "image") for im in images], truths


PREPARE = {"chartqa": _chartqa, "geometry3k": _geometry3k, "tallyqa": _tallyqa, "msearthmcq": _msearthmcq,
           "microvqa": _microvqa, "slake": _slake, "vstar": _vstar, "zwz": _zwz}


def _intergps(directory: Path):
    """InterGPS geometry3k split directory: one <id>/data.json (+ img_diagram.png) per problem."""
    rows = []
    for data in sorted(directory.glob("*/data.json"), key=lambda p: p.parent.name):
        row = json.loads(data.read_text())
        rows.append((f"problem {data.parent.name}", {**row, "id": row.get("id", data.parent.name),
                                                      "_image": f"{data.parent.name}/img_diagram.png"}))
    return rows


def prompt_of_row(path):
    """(system message, user suffix) of the first row of a verl file: the prompt a checkpoint
    trained on such rows saw, its user message being extra_info.question followed by the suffix."""
    [(label, row), *_] = _rows_of(Path(path)) or [("", None)]
    row = json.loads(row) if isinstance(row, str) else row
    try:
        (system, user), question = [m["content"] for m in row["prompt"]], row["extra_info"]["question"]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path} {label}: expected a verl row with a [system, user] prompt and "
                        "extra_info.question") from None
    if not user.startswith(question):
        raise DataError(f"{path} {label}: the user message does not start with extra_info.question")
    return system, user[len(question):]


def prepare(source, input_path, out_path, registry, image_root=None, skip_bad_rows=False, split="test",
            prompt_from=None):
    """Convert one release file of `source` into verl rows (data_source, prompt, images embedded,
    reward_model.ground_truth, extra_info) written to out_path. The prompt is rendered from the
    registry, or with prompt_from (a verl file, e.g. upstream's example row) is that row's system
    message and user suffix around each question (prompt_of_row).
    Returns {"read", "written", "skipped", "filtered", "errors"}; a bad row raises DataError naming
    the file and row unless skip_bad_rows. SLAKE's non-English questions are filtered (counted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if source not in PREPARE:
        raise DataError(f"unknown source {source!r}; expected one of {', '.join(PREPARE)}")
    system, suffix = prompt_of_row(prompt_from) if prompt_from else (system_prompt(registry), user_prompt(registry, ""))
    input_path = Path(input_path)
    if not input_path.exists():
        raise DataError(f"{input_path}: input not found")
    records = _intergps(input_path) if input_path.is_dir() else _rows_of(input_path)
    base = Path(image_root) if image_root else (input_path if input_path.is_dir() else input_path.parent)
    rows, report = [], {"read": len(records), "written": 0, "skipped": 0, "filtered": 0, "errors": []}
    for number, (label, record) in enumerate(records, start=1):
        if isinstance(record, str):
            try:
                record = json.loads(record)
            except json.JSONDecodeError as error:
                record = error  # reported below as this row's problem
        if source == "slake" and isinstance(record, dict) and record.get("q_lang", "en") != "en":
            report["filtered"] += 1
            continue
        try:
            if not isinstance(record, dict):
                raise _BadRow(f"expected an object: {record}")
            sample_id, question, images, truths = PREPARE[source](record, number)
            question = _required_string(_LEADING_IMAGE_PLACEHOLDERS.sub("", str(question)), "question")
            embedded = []
            for data, path in images:
                if data is None:
                    _image_from_path(path, base)  # refuses escapes, checks it decodes
                    data = (base / path).read_bytes()
                else:
                    _decode_image(data, None, "(embedded bytes)")
                embedded.append({"bytes": data, "path": path or f"{source}-{sample_id}.img"})
            markers = "<image>" * len(embedded)
            sample_id = f"{source}-{sample_id}"  # unique across benchmarks evaluated together
            rows.append({"data_source": source, "ability": "visual-question-answering", "images": embedded,
                         "prompt": [{"role": "system", "content": system},
                                    {"role": "user", "content": markers + question + suffix}],
                         "reward_model": {"ground_truth": list(_ground_truths(truths)), "style": "rule"},
                         "extra_info": {"index": sample_id, "question": markers + question, "split": split}})
        except (_BadRow, OSError, KeyError, TypeError, ValueError) as problem:
            message = f"{input_path} {label}: {problem}"
            if not skip_bad_rows:
                raise DataError(message) from None
            report["skipped"] += 1
            report["errors"].append(message)
    if not rows:
        raise DataError(f"{input_path}: no row could be converted ({report['skipped']} bad, "
                        f"{report['filtered']} filtered)")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_path)
    report["written"] = len(rows)
    return report


# ---------------------------------------------------------------------------------------------
# Worlds: everything world-specific that train.py and eval.py need, from one call

@dataclass
class World:
    """A registry, its experts' backends and samples, plus what only some worlds have.

    request_of(question) -> the input a format-warm-up demonstration sends its random pair (None:
    the question itself); goal: the sampled accuracy at which training may stop (None: never);
    build_policy(size, seed) -> (model, processor) from scratch (None: a checkpoint is needed)."""
    registry: object
    backends: dict                   # expert name -> experts.ChatBackend
    train: list                      # Samples (empty when only evaluating)
    test: list
    request_of: object = None
    goal: float | None = None
    build_policy: object = None


def samples_of(cfg, split):
    """The samples of `split` ("train" | "test") named by cfg[f"{split}_data"] (comma-separated
    JSONL / parquet paths; test cut to the first cfg["num_test"], all when 0), or None when it names none."""
    paths = cfg.get(f"{split}_data", "")
    if not paths:
        return None
    samples = load_samples(paths.split(","), use_stored_prompt=cfg["prompt"] == "stored")
    return samples[:cfg["num_test"]] if split == "test" and cfg["num_test"] > 0 else samples


def with_views(samples, registry, cfg, key, grpo_step=None):
    """The samples, each with its own renamed view of `registry` (cfg registry_views) drawn from
    (seed, key, position) and its family only (the view holds that family's oracle pair), and its
    prompt rendered from that view (a stored prompt names the registry's experts); the samples
    themselves when views are off. At GRPO step grpo_step < cfg view_growth_steps the views hold
    only a growing share of the other experts and skills (registry.draw_view's grown)."""
    ids = view_ids(cfg["registry_views"], cfg.get("heldout_registry", ""))
    if ids is None:
        return samples
    growth = cfg.get("view_growth_steps", 0)
    grown = min(1.0, (grpo_step + 1) / growth) if growth and grpo_step is not None else 1.0
    return [replace(s, registry=draw_view(registry, random.Random(f"view/{cfg['seed']}/{key}/{i}"), ids, s.family,
                                          grown), prompt=None) for i, s in enumerate(samples)]


def load_world(cfg):
    """The world cfg["world"] names: "toy" (toyworld.world: generated samples, in-process or served
    toy experts, a from-scratch policy, a goal) or "data" (data_world: files and HTTP experts)."""
    if cfg["world"] == "toy":
        import toyworld  # the toy world imports this module: import it only when it is asked for
        return toyworld.world(cfg)
    if cfg["world"] != "data":
        raise ValueError(f"config key 'world': expected toy or data, got {cfg['world']!r}")
    return data_world(cfg)


def data_world(cfg):
    """Samples from cfg["train_data"] / cfg["test_data"] and the registry's experts over HTTP (their
    base_urls, or cfg["expert_url"] for all); demonstrations send the whole question."""
    from experts import build_backends
    from registry import Registry
    if cfg["experts"] != "http":
        raise ValueError(f"config key 'experts': the data world calls its registry's experts over HTTP, got "
                         f"{cfg['experts']!r}; in-process toy experts belong to --world toy")
    registry = Registry.load(cfg["registry"])
    test = samples_of(cfg, "test")
    if test is None:
        raise ValueError("config key 'test_data': the data world needs test files (comma-separated JSONL / parquet)")
    return World(registry, build_backends(registry, base_url=cfg["expert_url"]), samples_of(cfg, "train") or [], test)



def main(argv=None):
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Convert a benchmark's public release file to verl parquet rows.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("prepare", help="python data.py prepare SOURCE --input PATH --out FILE.parquet")
    command.add_argument("source", choices=sorted(PREPARE))
    command.add_argument("--input", required=True, help="the release file (.json / .jsonl / .parquet) or, for "
                                                        "geometry3k from InterGPS, the split directory")
    command.add_argument("--out", required=True)
    command.add_argument("--image-root", help="directory image paths are relative to (TallyQA: the folder "
                                              "holding VG_100K*/ and COCO folders; default: beside the input)")
    command.add_argument("--registry", default=str(Path(__file__).resolve().parent / "configs" / "paper.json"),
                         help="renders the stored prompt (default: configs/paper.json)")
    command.add_argument("--prompt-from", help="a verl file whose first row's prompt (system message and "
                                               "user suffix) every row gets, e.g. upstream's val_data_example.parquet "
                                               "for the released checkpoint (default: rendered from --registry)")
    command.add_argument("--split", default="test")
    command.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) rows that cannot be "
                                                                     "converted instead of stopping at the first")
    args = parser.parse_args(argv)
    from registry import Registry, RegistryError
    try:
        report = prepare(args.source, args.input, args.out, Registry.load(args.registry), args.image_root,
                         args.skip_bad_rows, args.split, args.prompt_from)
    except (DataError, RegistryError, OSError) as error:
        sys.exit(f"data.py: {error}")
    for message in report["errors"]:
        print(f"skipped: {message}")
    print(f"{args.source}: read {report['read']}, written {report['written']} to {args.out}, "
          f"skipped {report['skipped']} bad, filtered {report['filtered']}")
    return report


if __name__ == "__main__":
    main()
