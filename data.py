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
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

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


_JSONL_KEYS = {"id", "question", "images", "answer", "data_source", "family", "prompt"}
_LEADING_IMAGE_PLACEHOLDERS = re.compile(r"^(\s*<image>)+\s*")


class _BadRow(Exception):
    """What is wrong with one row; turned into a DataError naming the file and row."""


def _decode_image(data: bytes | None, path: Path | None, label: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()
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


def _messages(prompt) -> tuple:
    if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt):
        raise _BadRow("prompt must be a list of {role, content} messages")
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
    prompt = _messages(row["prompt"]) if use_stored_prompt and "prompt" in row else None
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
    prompt = _messages(row["prompt"]) if use_stored_prompt and row.get("prompt") is not None else None
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
