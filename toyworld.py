"""The toy world: synthetic image questions and frozen toy experts whose competence is known exactly.

It mirrors the paper's setting at a size a CPU trains in minutes. Four families (and a fifth,
untrained) of 64x64 images, drawn with PIL from a seed:

    bar    five bars A-E               "what is the value of bar C?"              1..50
    count  up to 16 coloured shapes    "how many red circles are there?"          0..9
    grid   an R x C grid of colours    "what colour is the cell at row 2, column 3?"  6 colours
                                       "how many rows does the grid have?"        2..5
    angle  a triangle                  "... angles of 50 and 60 degrees. what is the third angle?"
    shape  1-7 shapes, one of its colour  "what shape is the red figure?"         circle, square, triangle
           (a fifth family no training registry serves: configs/toy_augmented.json adds it)

Experts and skills (configs/toy.json). A skill sends its expert a task header plus the policy's
input ("Task: read_bar\nRequest: <input>", skills/toy.py). The expert parses the question out of
the input (a whole question or just its slots, "bar C": the demonstrations teach the short form,
request_of), reads the answer from the image's pixels through the known drawing layout (the angle
family reads the two given angles from the question), and then -- decided by a hash of (expert,
task, query, image pixels), so a frozen expert always gives the same reply -- keeps that reading
with probability P or replies a different value from the same answer space:

                                         task fits the question    task does not fit
    expert's speciality is the family           0.95                     0.30
    expert's speciality is another family       0.20                     0.10

    An expert's speciality is its registry card (the "speciality" field: ChartSeer bar, CountBot
    count, GridEye grid, GeoMind angle; a card naming no family, or none, is competent at nothing),
    never its name, so any registry of cards is a world with known baselines and a renamed registry
    is the same world. Tasks: read_bar (Bar_Reader), count_shapes (Shape_Counter), third_angle
    (Angle_Solver), read_cell_colour / count_grid_rows (Cell_Colour_Reader / Grid_Size_Reader,
    the Level-2 children that Grid_Router picks from the words of the input): a skill's
    implementation, shown to the policy as its "task" card when the registry has cards.

So with the families in equal shares, the accuracy of every fixed (expert, skill) pair is known
in closed form (analytic_baselines): a matching pair 0.3125, any other pair 0.175, a random pair
0.209, oracle routing 0.95. A reply that can not be produced (no question recognised in the
input, a cell outside the grid, no image) is "unknown".

The SFT demonstrations have no think block: the tiny policy writes the call with a short request
and then copies the reply, which is all the format needs, and every token it writes is one more for
GRPO to erode (docs in README, "The toy world").
"""

import argparse
import base64
import hashlib
import io
import json
import math
import random
import re
import time
from pathlib import Path

from PIL import Image, ImageDraw

from chatserver import OpenAICompatServer
from data import Sample, World, samples_of
from experts import Reply, Services, build_backends
from maestro import CALL_SEPARATOR, INFO_CLOSE, INFO_OPEN, format_answer, format_call, system_prompt, user_prompt
from skills import SkillContext, run_skill
from skills.router import choose_child

FAMILIES = ("bar", "count", "grid", "angle")  # the families every toy registry serves
# A fifth family that no training registry serves: a world has it when its registry's oracle names it
# (configs/toy_augmented.json, the unseen registry plus a "shape" expert and skill; README "Unseen experts").
UNTRAINED_FAMILY = "shape"
KINDS = {"bar": ("bar",), "count": ("count",), "grid": ("grid_cell", "grid_rows"), "angle": ("angle",),
         "shape": ("shape",)}
FAMILY_OF_KIND = {kind: family for family, kinds in KINDS.items() for kind in kinds}

TASK_KIND = {"read_bar": "bar", "count_shapes": "count", "read_cell_colour": "grid_cell",
             "count_grid_rows": "grid_rows", "third_angle": "angle", "name_shape": "shape"}
# P(the reply is the expert's reading), keyed by (expert speciality fits, task fits).
P_CORRECT = {(True, True): 0.95, (True, False): 0.30, (False, True): 0.20, (False, False): 0.10}
UNKNOWN = "unknown"

TEMPLATES = {
    "bar": ("what is the value of bar {label}?",
            "how tall is bar {label} in the chart?",
            "read the height of bar {label}."),
    "count": ("how many {colour} {shape}s are there?",
              "count the {colour} {shape}s in the picture.",
              "what is the number of {colour} {shape}s?"),
    "grid_cell": ("what colour is the cell at row {row}, column {column}?",
                  "which colour fills row {row}, column {column} of the grid?"),
    "grid_rows": ("how many rows does the grid have?",
                  "count the rows of the grid."),
    "angle": ("in triangle ABC angle A is {a} and angle B is {b}; find angle C.",
              "a triangle has angles of {a} and {b} degrees. what is the third angle?",
              "two angles of a triangle are {a} and {b}. how big is the remaining angle?"),
    "shape": ("what shape is the {colour} figure?",
              "which shape is drawn in {colour}?",
              "name the shape of the {colour} one."),
}

SIZE = 64
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (50, 80, 220), "yellow": (230, 200, 30)}
GRID_COLOURS = {**SHAPE_COLOURS, "purple": (150, 60, 190), "orange": (245, 140, 30)}
BAR_COLOURS = ((60, 90, 170), (200, 90, 40), (70, 150, 90), (120, 120, 120))
SHAPES = ("circle", "square", "triangle")
BAR_LABELS = "ABCDE"
ANGLE_STEPS = range(20, 95, 5)      # the two given angles; the third is 15..140

ANSWER_SPACE = {
    "bar": [str(v) for v in range(1, 51)],
    "count": [str(v) for v in range(10)],
    "grid_cell": list(GRID_COLOURS),
    "grid_rows": [str(v) for v in range(2, 6)],
    "angle": [str(v) for v in range(15, 145, 5)],
    "shape": list(SHAPES),
}

# Layouts (pixels). Bars: bar i spans x in [4 + 12 i, 11 + 12 i], grows up from the axis at y = 60.
# Shapes: a 4 x 4 board of 16 px slots, the shape fills the 12 x 12 box 2 px inside its slot.
# Grid: 10 px cells on a 12 px pitch starting at (4, 4), inside 2 px black lines.
BAR_AXIS_Y, BAR_PITCH, BAR_WIDTH = 60, 12, 8
SLOT, SHAPE_BOX = 16, 12
GRID_ORIGIN, GRID_PITCH, GRID_CELL = 4, 12, 10


# ---------------------------------------------------------------------------------------------
# Drawing

def _board(pieces, rng: random.Random) -> dict:
    """The scene of a count board: the pieces [(colour, shape)] in random slots of its 4 x 4."""
    places = rng.sample(range(16), len(pieces))
    return {"shapes": sorted([place, c, s] for place, (c, s) in zip(places, pieces))}


def _new_task(family: str, rng: random.Random):
    """(kind, template index, slots, scene, answer) of one fresh question of `family`."""
    kind = rng.choice(KINDS[family])
    template = rng.randrange(len(TEMPLATES[kind]))
    if kind == "bar":
        values = [rng.randint(1, 50) for _ in BAR_LABELS]
        label = rng.choice(BAR_LABELS)
        scene = {"values": values, "colour": rng.randrange(len(BAR_COLOURS))}
        return kind, template, {"label": label}, scene, str(values[BAR_LABELS.index(label)])
    if kind == "count":
        colour, shape = rng.choice(list(SHAPE_COLOURS)), rng.choice(SHAPES)
        target, distractors = rng.randint(0, 9), rng.randint(0, 6)
        others = [(c, s) for c in SHAPE_COLOURS for s in SHAPES if (c, s) != (colour, shape)]
        pieces = [(colour, shape)] * target + [rng.choice(others) for _ in range(distractors)]
        return kind, template, {"colour": colour, "shape": shape}, _board(pieces, rng), str(target)
    if kind == "shape":  # the one figure of its colour among figures of other colours, on the count board
        colour, shape = rng.choice(list(SHAPE_COLOURS)), rng.choice(SHAPES)
        others = [(c, s) for c in SHAPE_COLOURS for s in SHAPES if c != colour]
        pieces = [(colour, shape)] + [rng.choice(others) for _ in range(rng.randint(0, 6))]
        return kind, template, {"colour": colour}, _board(pieces, rng), shape
    if kind in ("grid_cell", "grid_rows"):
        rows, columns = rng.randint(2, 5), rng.randint(2, 5)
        cells = [[rng.choice(list(GRID_COLOURS)) for _ in range(columns)] for _ in range(rows)]
        row, column = rng.randint(1, rows), rng.randint(1, columns)
        answer = cells[row - 1][column - 1] if kind == "grid_cell" else str(rows)
        slots = {"row": row, "column": column} if kind == "grid_cell" else {}
        return kind, template, slots, {"cells": cells}, answer
    a, b = rng.choice(ANGLE_STEPS), rng.choice(ANGLE_STEPS)
    while a + b > 165:
        a, b = rng.choice(ANGLE_STEPS), rng.choice(ANGLE_STEPS)
    scene = {"a": a, "b": b, "mirror": rng.random() < 0.5, "scale": round(rng.uniform(0.75, 1.0), 3)}
    return kind, template, {"a": a, "b": b}, scene, str(180 - a - b)


def render(kind: str, scene: dict) -> Image.Image:
    """The 64x64 RGB image of a scene."""
    image = Image.new("RGB", (SIZE, SIZE), WHITE)
    draw = ImageDraw.Draw(image)
    if kind == "bar":
        draw.line([(2, BAR_AXIS_Y), (SIZE - 3, BAR_AXIS_Y)], fill=BLACK)
        for i, value in enumerate(scene["values"]):
            x0 = 4 + BAR_PITCH * i
            draw.rectangle([x0, BAR_AXIS_Y - value, x0 + BAR_WIDTH - 1, BAR_AXIS_Y - 1],
                           fill=BAR_COLOURS[scene["colour"]])
    elif kind in ("count", "shape"):
        for slot, colour, shape in scene["shapes"]:
            x0, y0 = (slot % 4) * SLOT + 2, (slot // 4) * SLOT + 2
            x1, y1 = x0 + SHAPE_BOX - 1, y0 + SHAPE_BOX - 1
            fill = SHAPE_COLOURS[colour]
            if shape == "circle":
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            elif shape == "square":
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif kind in ("grid_cell", "grid_rows"):
        cells = scene["cells"]
        right = GRID_ORIGIN - 2 + GRID_PITCH * len(cells[0]) + 1
        bottom = GRID_ORIGIN - 2 + GRID_PITCH * len(cells) + 1
        draw.rectangle([GRID_ORIGIN - 2, GRID_ORIGIN - 2, right, bottom], fill=BLACK)
        for r, row in enumerate(cells):
            for c, colour in enumerate(row):
                x0, y0 = GRID_ORIGIN + GRID_PITCH * c, GRID_ORIGIN + GRID_PITCH * r
                draw.rectangle([x0, y0, x0 + GRID_CELL - 1, y0 + GRID_CELL - 1], fill=GRID_COLOURS[colour])
    else:
        a, b = math.radians(scene["a"]), math.radians(scene["b"])
        side_ac = math.sin(b) / math.sin(a + b)   # law of sines with AB = 1
        points = [(0.0, 0.0), (1.0, 0.0), (side_ac * math.cos(a), side_ac * math.sin(a))]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        scale = scene["scale"] * 56 / max(max(xs) - min(xs), max(ys) - min(ys))
        pixels = [(4 + (x - min(xs)) * scale, 60 - (y - min(ys)) * scale) for x, y in points]
        if scene["mirror"]:
            pixels = [(SIZE - 1 - x, y) for x, y in pixels]
        draw.polygon(pixels, fill=(200, 220, 250), outline=BLACK)
    return image


# ---------------------------------------------------------------------------------------------
# Samples

def _split_of(content_hash: str) -> str:
    """One fifth of all possible contents is test, the rest train: disjoint by construction."""
    return "test" if int(content_hash[:8], 16) % 5 == 0 else "train"


def make_samples(split: str, n: int, seed: int = 0, families=FAMILIES) -> list:
    """`n` toy samples of `split` ('train' | 'test'), `families` in turn (bar, count, grid, angle, ...).

    Deterministic in (split, n, seed), and a shorter list is a prefix of a longer one. A sample
    belongs to the split its content (question + image pixels) hashes to, so the splits never share an
    item whatever the seeds; within a split, contents are unique.
    """
    if split not in ("train", "test"):
        raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
    samples, seen, attempt = [], set(), 0
    while len(samples) < n:
        family = families[len(samples) % len(families)]
        rng = random.Random(f"toy/{seed}/{attempt}")
        attempt += 1
        kind, template, slots, scene, answer = _new_task(family, rng)
        question, image = TEMPLATES[kind][template].format(**slots), render(kind, scene)
        key = hashlib.sha256(question.encode() + image.tobytes()).hexdigest()
        if _split_of(key) != split or key in seen:
            continue
        seen.add(key)
        samples.append(Sample(id=f"toy-{split}-{seed}-{len(samples)}", question=question, images=(image,),
                              ground_truths=(answer,), data_source=f"toy_{family}", family=family))
    return samples


def write_samples(samples, path) -> None:
    """Write samples as data.load_samples JSONL, with their images as PNG files next to it."""
    path = Path(path)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for sample in samples:
            names = [f"images/{sample.id}-{i}.png" for i in range(len(sample.images))]
            for name, image in zip(names, sample.images):
                image.save(path.parent / name)
            out.write(json.dumps({"id": sample.id, "question": sample.question, "images": names,
                                  "answer": list(sample.ground_truths), "data_source": sample.data_source,
                                  "family": sample.family}) + "\n")


# ---------------------------------------------------------------------------------------------
# The experts' eyes: exact readers of the drawing layouts

def read_bar(image, label: str) -> int:
    """Height in pixels (= value) of bar `label`, scanned up the bar's middle column."""
    pixels, x = image.load(), 4 + BAR_PITCH * BAR_LABELS.index(label) + BAR_WIDTH // 2
    height = 0
    while height < BAR_AXIS_Y and pixels[x, BAR_AXIS_Y - 1 - height] != WHITE:
        height += 1
    return height


def _nearest(colour, palette: dict) -> str:
    return min(palette, key=lambda name: sum((p - q) ** 2 for p, q in zip(palette[name], colour)))


def read_shapes(image) -> list:
    """[(colour, shape)] of every occupied slot: shape from the filled fraction of its box
    (square 1, circle ~0.8, triangle ~0.55), colour from the most common filled pixel."""
    pixels, found = image.load(), []
    for slot in range(16):
        x0, y0 = (slot % 4) * SLOT + 2, (slot // 4) * SLOT + 2
        filled = [pixels[x, y] for y in range(y0, y0 + SHAPE_BOX) for x in range(x0, x0 + SHAPE_BOX)
                  if pixels[x, y] != WHITE]
        fraction = len(filled) / SHAPE_BOX ** 2
        if fraction < 0.2:
            continue
        shape = "square" if fraction > 0.92 else "circle" if fraction > 0.68 else "triangle"
        found.append((_nearest(max(set(filled), key=filled.count), SHAPE_COLOURS), shape))
    return found


def count_shapes(image, colour: str, shape: str) -> int:
    return read_shapes(image).count((colour, shape))


def _runs(line) -> int:
    """Number of runs of coloured (neither black nor white) pixels along a line of pixels."""
    runs, inside = 0, False
    for pixel in line:
        coloured = pixel not in (WHITE, BLACK)
        runs += coloured and not inside
        inside = coloured
    return runs


def grid_shape(image) -> tuple:
    """(rows, columns) counted along the first column and the first row of cells."""
    pixels, middle = image.load(), GRID_ORIGIN + GRID_CELL // 2
    return (_runs(pixels[middle, y] for y in range(SIZE)), _runs(pixels[x, middle] for x in range(SIZE)))


def read_cell_colour(image, row: int, column: int) -> str | None:
    rows, columns = grid_shape(image)
    if not (1 <= row <= rows and 1 <= column <= columns):
        return None
    x = GRID_ORIGIN + GRID_PITCH * (column - 1) + GRID_CELL // 2
    y = GRID_ORIGIN + GRID_PITCH * (row - 1) + GRID_CELL // 2
    return _nearest(image.getpixel((x, y)), GRID_COLOURS)


def read_answer(kind: str, slots: dict, image) -> str | None:
    """The exact answer of a parsed question about `image`, or None if it has none."""
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        return None
    if kind == "bar":
        return str(read_bar(image, slots["label"]))
    if kind == "count":
        return str(count_shapes(image, slots["colour"], slots["shape"]))
    if kind == "grid_cell":
        return read_cell_colour(image, slots["row"], slots["column"])
    if kind == "grid_rows":
        return str(grid_shape(image)[0])
    if kind == "shape":
        shapes = [shape for colour, shape in read_shapes(image) if colour == slots["colour"]]
        return shapes[0] if len(shapes) == 1 else None
    third = 180 - slots["a"] - slots["b"]
    return str(third) if third > 0 else None


_CELL = re.compile(r"\brow\s*(\d+)\s*,?\s*(?:and\s+)?column\s*(\d+)")
_ROWS = re.compile(r"\brows\b")
_BAR = re.compile(r"\bbar\s+([a-e])\b")
_SHAPES = re.compile(r"\b(" + "|".join(SHAPE_COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")
_SHAPE_OF = re.compile(r"\bshape\b.*?\b(" + "|".join(SHAPE_COLOURS) + r")\b|\b(" + "|".join(SHAPE_COLOURS)
                       + r")\b.*?\bshape\b")
_ANGLE = re.compile(r"\b(?:angles?|triangle)\b")
_NUMBER = re.compile(r"\d+")


def parse_question(text: str):
    """(kind, slots) of the toy question written in `text`, or None when there is none."""
    text = text.lower()
    if match := _CELL.search(text):
        return "grid_cell", {"row": int(match[1]), "column": int(match[2])}
    if _ROWS.search(text):
        return "grid_rows", {}
    if match := _BAR.search(text):
        return "bar", {"label": match[1].upper()}
    if match := _SHAPES.search(text):
        return "count", {"colour": match[1], "shape": match[2]}
    if match := _SHAPE_OF.search(text):
        return "shape", {"colour": match[1] or match[2]}
    numbers = _NUMBER.findall(text)
    if _ANGLE.search(text) and len(numbers) >= 2:
        return "angle", {"a": int(numbers[0]), "b": int(numbers[1])}
    return None


def request_of(question: str) -> str:
    """The shortest request the toy experts understand for `question`: its slots and nothing else
    ("bar C", "red circles", "row 2 column 3", "rows", "angles 50 60"). The demonstrations call with
    it, so the policy learns to pass on a few words of the question rather than copy all of it
    (a long copied input is what GRPO eroded before it learned the routing). An unrecognised
    question is passed on whole."""
    parsed = parse_question(question)
    if parsed is None:
        return question
    kind, slots = parsed
    return {"bar": "bar {label}", "count": "{colour} {shape}s", "grid_cell": "row {row} column {column}",
            "grid_rows": "rows", "angle": "angles {a} {b}", "shape": "{colour} shape"}[kind].format(**slots)


# ---------------------------------------------------------------------------------------------
# The experts

_REQUEST = re.compile(r"Task: (\S+)\nRequest: (.*)", re.S)


def expert_reply(speciality: str | None, text: str, images) -> str:
    """What a toy expert with card `speciality` replies to a skill's message `text` about `images`
    (the first is read). The card, not the name, decides: two experts with one card reply alike."""
    match = _REQUEST.fullmatch(text.strip())
    task, query = (match[1], match[2].strip()) if match else (None, text.strip())
    parsed = parse_question(query)
    reading = read_answer(*parsed, images[0]) if parsed and images else None
    if reading is None:
        return UNKNOWN
    kind = parsed[0]
    fits = (speciality == FAMILY_OF_KIND[kind], TASK_KIND.get(task) == kind)
    image = images[0].convert("RGB")
    digest = hashlib.sha256(f"{speciality}\n{task}\n{query}\n".encode() + image.tobytes()).digest()
    if int.from_bytes(digest[:8], "big") / 2 ** 64 < P_CORRECT[fits]:
        return reading
    wrong = [answer for answer in ANSWER_SPACE[kind] if answer != reading]
    return wrong[int.from_bytes(digest[8:16], "big") % len(wrong)]


class ToyExpert:
    """In-process toy expert: the ChatBackend interface (.name, .chat) of experts.py."""

    def __init__(self, name: str, speciality: str | None):
        self.name, self.speciality = name, speciality

    def chat(self, text, images=(), system=None, **generation) -> Reply:
        start = time.monotonic()
        reply = expert_reply(self.speciality, text, list(images))
        prompt_words = len(text.split()) + len((system or "").split())  # as the HTTP server counts
        return Reply(reply, prompt_words, len(reply.split()), time.monotonic() - start)


def toy_backends(registry) -> dict:
    """{expert name: ToyExpert} for every expert of `registry`, competent as its card says."""
    return {name: ToyExpert(name, expert.speciality) for name, expert in registry.experts.items()}


def _decode_data_url(url: str) -> Image.Image:
    if not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError(f"toy experts take images as base64 data URLs, got {url[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def _respond(request: dict, specialities: dict) -> str:
    """An OpenAI chat request -> the toy expert's reply; the expert is the request's "model", whose
    card is specialities[model] (an unknown model has none: competent at nothing)."""
    texts, images = [], []
    for message in request.get("messages", []):
        if message.get("role") != "user":
            continue
        content = message.get("content", "")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                images.append(_decode_data_url(part["image_url"]["url"]))
    return expert_reply(specialities.get(str(request.get("model", ""))), "\n".join(texts), images)


TOY_REGISTRIES = tuple(str(Path(__file__).resolve().parent / "configs" / name)
                       for name in ("toy.json", "toy_pool.json", "toy_seen.json", "toy_unseen.json",
                                    "toy_augmented.json"))


def served_specialities(registry_paths=TOY_REGISTRIES) -> dict:
    """{served model name: speciality card} of the experts of the given registry files; a model
    served under two different cards is refused (the server could not tell which one is asked)."""
    from registry import Registry
    cards = {}
    for path in registry_paths:
        for expert in Registry.load(path).experts.values():
            if cards.setdefault(expert.model, expert.speciality) != expert.speciality:
                raise ValueError(f"{path}: model {expert.model!r} has the card {expert.speciality!r} here and "
                                 f"{cards[expert.model]!r} in another registry; a served model has one card")
    return cards


def toy_server(host: str = "127.0.0.1", port: int = 0, registry_paths=TOY_REGISTRIES) -> OpenAICompatServer:
    """The toy experts of the registry files behind one OpenAI-compatible endpoint (not started;
    use as a context manager)."""
    cards = served_specialities(registry_paths)
    return OpenAICompatServer(lambda request: _respond(request, cards), host=host, port=port,
                              model_names=tuple(cards))


def serve(host: str = "127.0.0.1", port: int = 8765, registry_paths=TOY_REGISTRIES) -> None:
    """Serve the toy experts over HTTP until interrupted (`python toyworld.py serve --port 8765`)."""
    server = toy_server(host, port, registry_paths)
    print(f"toy experts {', '.join(served_specialities(registry_paths))} (and any other model name, with no "
          f"speciality) at {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# The toy policy

def build_toy_policy(registry, size: str = "tiny", seed: int = 0, view_ids=None):
    """(model, processor): a from-scratch Qwen3-VL whose tokenizer was trained on what the toy
    policy reads and writes (prompts, questions, calls, observations, answers), with the expert and
    skill names and the call separator as single tokens, and an image budget of 4 visual tokens per
    64x64 image. view_ids (training on renamed registries, registry.draw_view): the prompts and
    calls are those of random views, names are not single tokens and digits are split (expert-63 is
    'expert', '-', '6', '3'), so a name never seen (an id held out of view_ids) is a new combination
    of tokens that were, each in a place it was: whole-number tokens left an unseen id a token the
    policy had never written as a name, and it wrote no valid call on one (README, "Unseen experts")."""
    from policy import build_policy, build_processor, build_tokenizer  # transformers: slow import
    from registry import draw_view

    rng = random.Random(seed)
    backends, services = toy_backends(registry), Services({})
    views = [draw_view(registry, rng, view_ids) if view_ids else registry for _ in range(100)]
    corpus = [system_prompt(view) for view in views]  # weighted like the questions: it is in every prompt
    corpus += ["system", "user", "assistant"] * 100  # the chat template's role names: a token each, not 4-8
    for i, sample in enumerate(make_samples("train", 400, seed)):
        view = views[i % len(views)]
        expert = rng.choice(view.advertised_experts())
        skill = rng.choice(view.advertised_skills())
        request = request_of(sample.question)
        reply = run_skill(SkillContext(view, skill, backends[view.expert_origin.get(expert.name, expert.name)],
                                       services, request, sample.images)).text
        corpus += [user_prompt(view, sample.question), format_call(expert.name, skill.name, request),
                   f"{INFO_OPEN}{reply}{INFO_CLOSE}", format_answer(reply)]
    corpus += [answer for space in ANSWER_SPACE.values() for answer in space] * 20  # as replies are
    names = [] if view_ids else [*registry.experts, *(s.name for s in registry.skills.values())]
    tokenizer = build_tokenizer(corpus, vocab_size=1000, extra_tokens=(*names, CALL_SEPARATOR),
                                split_digits=bool(view_ids))
    processor = build_processor(tokenizer, shortest_edge=32 * 32, longest_edge=SIZE * SIZE)
    return build_policy(processor, size=size, seed=seed), processor


# ---------------------------------------------------------------------------------------------
# Closed-form baselines

def _task_sent(registry, skill, query: str) -> str | None:
    """The toy task a skill asks for on `query` (routers descend as skills/router.py does)."""
    while skill.children:
        skill = registry.skills[choose_child(skill, query)]
    module, _, function = skill.implementation.partition(":")
    return function if module == "toy" else None


def _example_questions(kind: str) -> list:
    slots = {"label": "C", "colour": "red", "shape": "circle", "row": 2, "column": 3, "a": 50, "b": 60}
    return [template.format(**slots) for template in TEMPLATES[kind]]


def pair_accuracy(registry, expert, skill, family: str) -> float:
    """Expected accuracy of always calling (expert, skill) with request_of(question) on `family`:
    kinds in equal shares, templates in equal shares, as make_samples draws them."""
    speciality_fits = expert.speciality == family
    per_kind = []
    for kind in KINDS[family]:
        questions = _example_questions(kind)
        per_kind.append(sum(P_CORRECT[(speciality_fits,
                                       TASK_KIND.get(_task_sent(registry, skill, request_of(q))) == kind)]
                            for q in questions) / len(questions))
    return sum(per_kind) / len(per_kind)


def families_of(registry) -> tuple:
    """The families of the toy world a registry defines: the four, and the untrained fifth when the
    registry's oracle names it."""
    return FAMILIES + ((UNTRAINED_FAMILY,) if UNTRAINED_FAMILY in registry.oracle else ())


def analytic_baselines(registry) -> dict:
    """Closed-form accuracies on the toy splits (the registry's families_of in equal shares) of every
    advertised (expert, skill) pair, a uniformly random pair, the best fixed pair and oracle routing
    (registry.oracle by family; None if it lacks a family); plus the training goal
    max(best fixed + 0.2, 0.9 oracle), the toy world's goal (README)."""
    experts, skills, families = registry.advertised_experts(), registry.advertised_skills(), families_of(registry)
    per_family = {e.name: {s.name: {f: pair_accuracy(registry, e, s, f) for f in families} for s in skills}
                  for e in experts}
    pairs = {e: {s: round(sum(by_family.values()) / len(families), 6) for s, by_family in row.items()}
             for e, row in per_family.items()}
    flat = [(acc, e, s) for e, row in pairs.items() for s, acc in row.items()]
    best, best_expert, best_skill = max(flat)
    oracle = None
    if all(f in registry.oracle for f in families):
        oracle = sum(pair_accuracy(registry, registry.experts[registry.oracle[f][0]],
                                   registry.skills[registry.oracle[f][1]], f) for f in families) / len(families)
        oracle = round(oracle, 6)
    return {"pairs": pairs, "random_pair": round(sum(acc for acc, _, _ in flat) / len(flat), 6),
            "best_fixed_pair": best, "best_pair": [best_expert, best_skill], "oracle": oracle,
            "goal": None if oracle is None else round(max(best + 0.2, 0.9 * oracle), 6)}


# ---------------------------------------------------------------------------------------------
# The world seam (data.load_world): everything train.py and eval.py need of the toy world

TEST_QUESTIONS = 256  # the generated test split when cfg["num_test"] is 0
GOAL_MARGIN = 0.03  # about 1.5 standard errors of a 256-question sampled accuracy: the final evaluation
                    # draws fresh rollouts and should clear the closed-form goal too, not just this estimate


def world(cfg) -> World:
    """The toy world of a config: its registry (cfg["registry"]), experts in process (cfg["experts"]
    "toy") or behind cfg["expert_url"] / the registry's URLs ("http", e.g. `python toyworld.py
    serve`), generated splits (or files written by `python toyworld.py write`, when cfg names
    them), demonstrations that send request_of(question), the goal analytic_baselines + GOAL_MARGIN,
    and the from-scratch policy."""
    from registry import Registry, view_ids
    registry = Registry.load(cfg["registry"])
    for skill in registry.skills.values():  # a toy skill's card must say what it really asks for
        module, _, task = skill.implementation.partition(":")
        if module == "toy" and skill.task not in (None, task):
            raise ValueError(f"{registry.source}: skill {skill.name!r} asks for the task {task!r} "
                             f"({skill.implementation}) but its card says task {skill.task!r}")
    ids = view_ids(cfg.get("registry_views", ""), cfg.get("heldout_registry", ""))
    if cfg["experts"] == "toy":
        backends = toy_backends(registry)
    elif cfg["experts"] == "http":
        backends = build_backends(registry, base_url=cfg["expert_url"])
    else:
        raise ValueError(f"config key 'experts': expected toy (in process) or http, got {cfg['experts']!r}")
    train, families = samples_of(cfg, "train"), families_of(registry)
    if train is None:
        train = make_samples("train", cfg.get("num_train", 0), cfg["seed"], families)
    test = samples_of(cfg, "test") or make_samples("test", cfg["num_test"] or TEST_QUESTIONS, cfg["seed"], families)
    goal = analytic_baselines(registry)["goal"]
    return World(registry, backends, train, test, request_of=request_of,
                 goal=None if goal is None else goal + GOAL_MARGIN,
                 build_policy=lambda size, seed: build_toy_policy(registry, size, seed, ids))



def main(argv=None):
    parser = argparse.ArgumentParser(description="The toy world: serve its experts, print its baselines, "
                                                 "write a split to files.")
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve", help="serve the toy experts as an OpenAI-compatible endpoint")
    serving.add_argument("--host", default="127.0.0.1")
    serving.add_argument("--port", type=int, default=8765)
    serving.add_argument("--registry", action="append", help="registry file whose experts to serve "
                         "(repeatable; default: the toy registries in configs/)")
    baselines = commands.add_parser("baselines", help="print the closed-form baseline accuracies")
    baselines.add_argument("--registry", default="configs/toy.json")
    writing = commands.add_parser("write", help="write a split as JSONL + PNG images (for --test_data)")
    writing.add_argument("--split", choices=("train", "test"), default="test")
    writing.add_argument("--n", type=int, default=256)
    writing.add_argument("--seed", type=int, default=0)
    writing.add_argument("--out", required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.host, args.port, tuple(args.registry or TOY_REGISTRIES))
    elif args.command == "write":
        write_samples(make_samples(args.split, args.n, args.seed), args.out)
    else:
        from registry import Registry
        print(json.dumps(analytic_baselines(Registry.load(args.registry)), indent=2))


if __name__ == "__main__":
    main()
