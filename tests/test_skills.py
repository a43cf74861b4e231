"""Skills against a real OpenAI-compatible server on 127.0.0.1 that plays expert and services."""

import base64
import io
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from chatserver import OpenAICompatServer
from experts import Call, ExpertError, OpenAIChatClient, Reply, Services
from registry import Registry
from skills import SkillContext, run_skill, task_for
from skills import chart, ocrbench, vlmsareblind
from skills.router import choose_child, phrase_count

SERVICE_REPLIES = {
    "ocr-model": "OCR SAYS 42 cm",
    "caption-model": "CAPTION SAYS a red square",
    "detection-model": '```json\n[{"label": "apple", "bbox_2d": [1, 1, 8, 8]}]\n```',
    "zoom-model": '<think>where</think><tool_call>{"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 16, 8]}}</tool_call>',
}


class World:
    """Records every request as (model, system text, user text, images) and answers per model.
    The expert answers "<think>private</think>reply N" (N counts expert requests) and names a line
    chart when asked for a chart type."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []
        self.broken = set()  # models that answer HTTP 500

    def __call__(self, request):
        messages = request["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        parts = messages[-1]["content"]
        text = parts[-1]["text"]
        images = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))
                  for p in parts if p["type"] == "image_url"]
        model = request["model"]
        with self.lock:
            self.requests.append((model, system, text, images))
            experts_so_far = sum(r[0] == "expert-model" for r in self.requests)
        if model in self.broken:
            return 500, {"error": "down"}, {}
        if model != "expert-model":
            return SERVICE_REPLIES[model]
        if "bar, line or pie" in text:
            return "<think>private</think>It looks like a line chart."
        return f"<think>private</think>reply {experts_so_far}"

    def models(self):
        return [r[0] for r in self.requests]

    def expert_requests(self):
        return [r for r in self.requests if r[0] == "expert-model"]


def skill(name, implementation, level=1, **extra):
    return {"name": name, "level": level, "description": f"{name} guideline", "implementation": implementation, **extra}


OCR_CHILDREN = ["OCRBench_Text_Recognition_Skill", "OCRBench_Key_Information_Extraction_Skill",
                "OCRBench_Scene_Text_QA_Skill"]
BLIND_CHILDREN = ["VLMsAreBlind_Highlighted_Character_Recognition", "VLMsAreBlind_Geometric_Shape_Counting"]


def make_registry(url):
    return Registry.from_dict({
        "experts": [{"name": "Expert", "description": "d", "base_url": url, "model": "expert-model"}],
        "skills": [
            skill("Geometric_Problem_Solver", "geometric:solve"),
            skill("Chart_Problem_Solver", "chart:solve"),
            skill("Science_Problem_Solver", "science:solve"),
            skill("Counting_Problem_Solver", "counting:solve"),
            skill("Perception_Problem_Solver", "perception:solve"),
            skill("OCRBench_Master_Router_Skill", "router:route", children=OCR_CHILDREN,
                  default_child="OCRBench_Scene_Text_QA_Skill",
                  route_keywords={"OCRBench_Text_Recognition_Skill": ["what is written in the image"],
                                  "OCRBench_Key_Information_Extraction_Skill": ["total amount", "receipt", "date"]}),
            skill("VLMsAreBlind_Master_Router_Skill", "router:route", children=BLIND_CHILDREN,
                  default_child="VLMsAreBlind_Geometric_Shape_Counting",
                  route_keywords={"VLMsAreBlind_Highlighted_Character_Recognition": ["red oval", "which letter"],
                                  "VLMsAreBlind_Geometric_Shape_Counting": ["how many circles"]}),
            *(skill(name, "ocrbench:solve", level=2) for name in OCR_CHILDREN),
            *(skill(name, "vlmsareblind:solve", level=2, addressable=False) for name in BLIND_CHILDREN),
        ],
        "services": [{"name": name, "base_url": url, "model": f"{name}-model", "max_retries": 0}
                     for name in ("ocr", "caption", "detection", "zoom")],
    })


@pytest.fixture(scope="module")
def server():
    world = World()
    with OpenAICompatServer(world) as server:
        server.world = world
        yield server


@pytest.fixture
def world(server):
    server.world.requests.clear()
    server.world.broken.clear()
    return server.world


def picture(color="red", size=(32, 32)):
    return Image.new("RGB", size, color)


def run(server, skill_name, query, images=None, services=None):
    registry = make_registry(server.url)
    expert = OpenAIChatClient("Expert", server.url, "expert-model", max_retries=0, timeout=10)
    ctx = SkillContext(registry, registry.skills[skill_name], expert,
                       services if services is not None else Services(registry.services),
                       query, tuple(images) if images is not None else (picture(),))
    return run_skill(ctx)


def assert_clean(world, result, query):
    """Every expert prompt carries the policy's input; no reasoning leaks into prompts or the reply."""
    for _, _, text, _ in world.expert_requests():
        assert query in text and "private" not in text
    assert "<think>" not in result.text and "private" not in result.text


def test_geometric_pipeline(server, world):
    """Extract, fuse, solve, verify: four expert calls, each seeing the image and what came before."""
    query = "Find the length of AB."
    result = run(server, "Geometric_Problem_Solver", query)
    assert world.models() == ["caption-model", "ocr-model"] + ["expert-model"] * 4
    (_, _, extract, _), (_, _, fuse, _), (_, _, solve, _), (_, _, verify, _) = world.expert_requests()
    assert all([im.size for im in r[3]] == [(32, 32)] for r in world.expert_requests())
    assert "RELATIONSHIPS" in extract and "CAPTION SAYS" not in extract
    assert "reply 1" in fuse and "CAPTION SAYS" in fuse and "OCR SAYS" in fuse  # reconciles with the tools
    assert "reply 2" in solve and "reply 2" in verify and "reply 3" in verify and "PLAUSIBILITY CHECK" in verify
    assert result.text == "reply 4" and result.path == ("Geometric_Problem_Solver",)
    assert [(c.name, c.kind, c.skill, c.error) for c in result.calls] == [
        ("caption", "service", "Geometric_Problem_Solver", None), ("ocr", "service", "Geometric_Problem_Solver", None),
        *[("Expert", "expert", "Geometric_Problem_Solver", None)] * 4]
    assert_clean(world, result, query)


def test_services_run_per_image_and_expert_sees_all_images(server, world):
    result = run(server, "Geometric_Problem_Solver", "Compare the figures.", images=[picture(), picture("blue", (20, 10))])
    assert world.models() == ["caption-model", "caption-model", "ocr-model", "ocr-model"] + ["expert-model"] * 4
    assert all([im.size for im in r[3]] == [(32, 32), (20, 10)] for r in world.expert_requests())
    assert "Text read from image 2" in world.expert_requests()[1][2]
    assert result.text == "reply 4"


def test_chart_pipeline_uses_the_classified_type(server, world):
    query = "What is the highest value of the blue series?"
    result = run(server, "Chart_Problem_Solver", query)
    assert world.models() == ["ocr-model", "expert-model", "expert-model"]
    classify, answer = world.expert_requests()
    assert "OCR SAYS" in classify[2] and "OCR SAYS" in answer[2]
    assert chart.GUIDANCE["line"] in answer[2] and chart.GUIDANCE["bar"] not in answer[2]
    assert result.text == "reply 2"
    assert_clean(world, result, query)


def test_chart_kind():
    assert chart.chart_kind("A PIE chart, not a bar chart") == "pie"
    assert chart.chart_kind("Line.") == "line" and chart.chart_kind("no idea") == "bar"
    assert chart.chart_kind("pipeline sidebar") == "bar"  # whole words only


def test_science_pipeline_attaches_the_crop(server, world):
    query = "Which arrow shows the force of gravity?"
    result = run(server, "Science_Problem_Solver", query)
    assert world.models() == ["caption-model", "ocr-model", "zoom-model", "expert-model"]
    assert query in world.requests[2][2]  # the zoom service is asked about the policy's question
    (_, _, text, images), = world.expert_requests()
    assert [im.size for im in images] == [(32, 32), (16, 8)]
    assert "magnified crop" in text and "CAPTION SAYS" in text and "OCR SAYS" in text
    assert result.text == "reply 1"
    assert_clean(world, result, query)


def test_a_detection_reply_without_objects_is_unavailable_not_nothing_detected(server, world, monkeypatch):
    monkeypatch.setitem(SERVICE_REPLIES, "detection-model", "I cannot help with that.")
    result = run(server, "Counting_Problem_Solver", "How many apples are there?", images=[picture()])
    enumerate_ = world.expert_requests()[0]
    assert "(detector unavailable: bad_response)" in enumerate_[2] and "nothing detected" not in enumerate_[2]
    assert [(c.name, c.error) for c in result.calls if c.name == "detection"] == [("detection", "bad_response")]


def test_a_service_reply_reaches_the_expert_without_its_reasoning(server, world, monkeypatch):
    monkeypatch.setitem(SERVICE_REPLIES, "caption-model", "<think>maybe a cat, or eight?</think>CAPTION SAYS a red square")
    run(server, "Science_Problem_Solver", "Which force acts?")
    (_, _, text, _), = world.expert_requests()
    assert "Description of image 1:\nCAPTION SAYS a red square" in text and "maybe a cat" not in text


def test_a_zoom_tool_call_without_a_box_is_recorded_as_bad_response(server, world, monkeypatch):
    monkeypatch.setitem(SERVICE_REPLIES, "zoom-model", '<tool_call>{"name": "image_zoom_in", "arguments": {}}</tool_call>')
    result = run(server, "Perception_Problem_Solver", "What colour is the cup?")
    (_, _, text, images), = world.expert_requests()
    assert len(images) == 1 and result.text == "reply 1"  # the skill goes on without a magnified view
    assert [(c.name, c.error) for c in result.calls if c.name == "zoom"] == [("zoom", "bad_response")]


def test_counting_pipeline(server, world):
    """Detection and a zoom (shown the detections drawn) per image, then two expert calls over
    [original, boxed, crop] per image."""
    query = "How many apples are there?"
    result = run(server, "Counting_Problem_Solver", query, images=[picture(), picture("blue", (20, 10))])
    assert world.models() == ["detection-model", "zoom-model"] * 2 + ["expert-model"] * 2
    zoom = [r for r in world.requests if r[0] == "zoom-model"][0]
    assert [im.size for im in zoom[3]] == [(32, 32), (32, 32)] and "apple at [1, 1, 8, 8]" in zoom[2]
    assert zoom[3][1].getpixel((1, 1)) != zoom[3][0].getpixel((1, 1))  # the second one has the box drawn
    enumerate_, verify = world.expert_requests()
    assert [im.size for im in enumerate_[3]] == [(32, 32), (32, 32), (16, 8), (20, 10), (20, 10), (16, 8)]
    assert "apple at [1, 1, 8, 8]" in enumerate_[2]
    assert [im.size for im in verify[3]] == [im.size for im in enumerate_[3]]
    assert "reply 1" in verify[2]
    assert result.text == "reply 2"
    assert_clean(world, result, query)


def test_perception_pipeline(server, world):
    query = "What colour is the cup?"
    result = run(server, "Perception_Problem_Solver", query)
    assert world.models() == ["zoom-model", "expert-model"]
    (_, system, text, images), = world.expert_requests()
    assert system and [im.size for im in images] == [(32, 32), (16, 8)] and "magnified" in text
    assert result.text == "reply 1" and result.path == ("Perception_Problem_Solver",)
    assert_clean(world, result, query)


def test_perception_shows_only_the_first_image(server, world):
    run(server, "Perception_Problem_Solver", "What colour is the cup?", images=[picture(), picture("blue", (20, 10))])
    (_, _, _, images), = world.expert_requests()
    assert [im.size for im in images] == [(32, 32), (16, 8)]  # first image + its crop, as upstream


def test_failed_zoom_degrades_to_the_original_image(server, world):
    world.broken.add("zoom-model")
    result = run(server, "Perception_Problem_Solver", "What colour is the cup?")
    (_, _, text, images), = world.expert_requests()
    assert len(images) == 1 and "magnified" not in text
    assert [c.error for c in result.calls] == ["http_5xx", None] and result.text == "reply 1"


def test_missing_services_are_marked_unavailable(server, world):
    result = run(server, "Geometric_Problem_Solver", "Find x.", services=Services({}))
    assert world.models() == ["expert-model"] * 4
    assert "(unavailable: unavailable)" in world.expert_requests()[1][2]
    assert [c.error for c in result.calls] == ["unavailable", "unavailable", None, None, None, None]
    assert result.calls[0] == Call("caption", "service", "Geometric_Problem_Solver", 0, 0, 0.0, "unavailable")


def test_expert_failure_fails_the_skill(server, world):
    world.broken.add("expert-model")
    with pytest.raises(ExpertError) as info:
        run(server, "Chart_Problem_Solver", "What is the maximum?")
    assert info.value.kind == "http_5xx" and info.value.name == "Expert"
    assert [(c.name, c.error) for c in info.value.calls] == [("ocr", None), ("Expert", "http_5xx")]


def test_reply_with_only_reasoning_is_empty(server, world):
    class Thinker:
        name = "Thinker"

        def chat(self, text, images=(), system=None, **generation):
            return Reply("<think>never finishes", 3, 4, 0.1)

    registry = make_registry(server.url)
    ctx = SkillContext(registry, registry.skills["Perception_Problem_Solver"], Thinker(), Services({}), "q", (picture(),))
    with pytest.raises(ExpertError) as info:
        run_skill(ctx)
    assert info.value.kind == "empty" and info.value.calls[-1] == Call("Thinker", "expert", "Perception_Problem_Solver", 3, 4, 0.1)


def test_ocrbench_router_dispatches_and_computes_only_what_the_child_uses(server, world):
    query = "What is the total amount on this receipt?"
    result = run(server, "OCRBench_Master_Router_Skill", query)
    assert result.path == ("OCRBench_Master_Router_Skill", "OCRBench_Key_Information_Extraction_Skill")
    assert world.models() == ["ocr-model", "detection-model", "zoom-model", "expert-model"]  # no caption
    (_, _, text, images), = world.expert_requests()
    assert "OCR SAYS" in text and "apple at" in text and len(images) == 2
    assert {c.skill for c in result.calls} == {"OCRBench_Key_Information_Extraction_Skill"}
    assert result.text == "reply 1"
    assert_clean(world, result, query)


def test_ocrbench_router_default_child(server, world):
    result = run(server, "OCRBench_Master_Router_Skill", "What does the sign on the shop say?")
    assert result.path == ("OCRBench_Master_Router_Skill", "OCRBench_Scene_Text_QA_Skill")
    assert world.models() == ["ocr-model", "caption-model", "detection-model", "zoom-model", "expert-model"]


def test_ocrbench_child_called_directly(server, world):
    result = run(server, "OCRBench_Text_Recognition_Skill", "Read the word.")
    assert result.path == ("OCRBench_Text_Recognition_Skill",)
    assert world.models() == ["ocr-model", "zoom-model", "expert-model"]
    assert ocrbench.TASKS["text_recognition"].requirements[0] in world.expert_requests()[0][2]


def test_vlmsareblind_router(server, world):
    result = run(server, "VLMsAreBlind_Master_Router_Skill", "Which letter is inside the red oval?")
    assert result.path == ("VLMsAreBlind_Master_Router_Skill", "VLMsAreBlind_Highlighted_Character_Recognition")
    assert world.models() == ["ocr-model", "zoom-model", "expert-model"]
    world.requests.clear()
    result = run(server, "VLMsAreBlind_Master_Router_Skill", "How many circles are in the image?")
    assert result.path == ("VLMsAreBlind_Master_Router_Skill", "VLMsAreBlind_Geometric_Shape_Counting")
    assert world.models() == ["zoom-model", "expert-model"]
    text = world.expert_requests()[0][2]
    assert vlmsareblind.TASKS["geometric_shape_counting"].requirements[0] in text


def test_routing_rules():
    registry = make_registry("http://127.0.0.1:9/v1")
    router = registry.skills["OCRBench_Master_Router_Skill"]
    assert phrase_count("total amount", "TOTAL\n amount, and the total amount") == 2
    assert phrase_count("date", "the dates and updated values") == 0  # whole words only
    assert choose_child(router, "receipt date") == "OCRBench_Key_Information_Extraction_Skill"
    assert choose_child(router, "nothing relevant") == "OCRBench_Scene_Text_QA_Skill"
    tie = "what is written in the image on the receipt"  # one hit each: the child listed first wins
    assert choose_child(router, tie) == "OCRBench_Text_Recognition_Skill"


def test_every_level2_skill_of_the_paper_config_has_a_task():
    config = json.loads((Path(__file__).resolve().parent.parent / "configs" / "paper.json").read_text())
    families = {"ocrbench:solve": ("OCRBench", ocrbench.TASKS), "vlmsareblind:solve": ("VLMsAreBlind", vlmsareblind.TASKS)}
    seen = set()
    for entry in config["skills"]:
        if entry["implementation"] in families:
            family, tasks = families[entry["implementation"]]
            ctx = SkillContext(None, SimpleNamespace(**entry), None, None, "", ())
            seen.add(task_for(ctx, family, tasks).title)
    assert len(seen) == len(ocrbench.TASKS) + len(vlmsareblind.TASKS)


def test_unknown_level2_name_is_a_clear_error(server, world):
    registry = make_registry(server.url)
    ctx = SkillContext(registry, registry.skills["Chart_Problem_Solver"], None, None, "q", ())
    with pytest.raises(ValueError, match="OCRBench_<task>"):
        task_for(ctx, "OCRBench", ocrbench.TASKS)


def test_run_skill_rejects_bad_implementations(server):
    registry = make_registry(server.url)
    for implementation, message in (("../evil:solve", "module:function"), ("chart:nothing", "no function")):
        bad = SimpleNamespace(name="Bad", implementation=implementation)
        with pytest.raises(ValueError, match=message):
            run_skill(SkillContext(registry, bad, None, None, "q", ()))
