"""Skills: multi-step pipelines that run one frozen expert, helped by auxiliary services.

Two tiers share one contract, solve(ctx) -> SkillResult:
  Level-1 solvers  (geometric, chart, science, counting, perception) and routers (router.route),
  Level-2 skills   reached through a router (ocrbench.solve, vlmsareblind.solve).
A registry Skill names its function as "module:function" inside this package; run_skill resolves it.

Shared rules, implemented once here:
  - every expert and service reply goes through strip_think, and the final reply is returned whole
    (truncation to a token budget is the environment's job);
  - an auxiliary service that is missing or fails does not fail the skill: its evidence is written
    as unavailable in the prompt and the Call records the error; a failing expert call does fail it.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from experts import Call, ChatBackend, ExpertError, Services
from maestro import strip_think


@dataclass
class SkillContext:
    registry: object  # registry.Registry (routers look their children up in it)
    skill: object  # registry.Skill being run
    expert: ChatBackend
    services: Services
    query: str  # the policy's input text for this call
    images: tuple  # PIL images of the sample, in order


@dataclass
class SkillResult:
    text: str
    calls: list[Call]
    path: tuple[str, ...]  # skill names taken, e.g. (router, child)


def run_skill(ctx: SkillContext) -> SkillResult:
    """Run ctx.skill's implementation ("module:function" inside this package)."""
    module_name, _, function_name = ctx.skill.implementation.partition(":")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", module_name) or not function_name:
        raise ValueError(f"skill {ctx.skill.name!r}: implementation {ctx.skill.implementation!r} "
                         f"must look like 'module:function' with a module of the skills package")
    module = importlib.import_module(f"{__name__}.{module_name}")
    function = getattr(module, function_name, None)
    if function is None:
        raise ValueError(f"skill {ctx.skill.name!r}: skills/{module_name}.py has no function {function_name!r}")
    return function(ctx)


def ask_expert(ctx: SkillContext, calls: list[Call], prompt: str, images=None, system: str | None = None) -> str:
    """One expert call (all sample images unless `images` is given), recorded in `calls`;
    returns the reply with its reasoning removed (services' replies lose theirs in experts.Services).
    A failure re-raises the ExpertError with the skill's calls so far in its `calls`, so the caller
    can still account for what was spent."""
    images = ctx.images if images is None else images
    try:
        reply = ctx.expert.chat(prompt, images, system=system)
    except ExpertError as err:
        calls.append(Call(ctx.expert.name, "expert", ctx.skill.name, 0, 0, 0.0, error=err.kind))
        err.calls = list(calls)
        raise
    calls.append(Call(ctx.expert.name, "expert", ctx.skill.name, reply.prompt_tokens, reply.completion_tokens,
                      reply.latency, truncated=reply.truncated))
    text = strip_think(reply.text).strip()
    if not text:
        raise ExpertError("empty", ctx.expert.name, "the reply held only reasoning and no answer", calls)
    return text


# Evidence from services, one section per image. Each is computed only when a skill asks for it.


def ocr_evidence(ctx: SkillContext, calls: list[Call]) -> str:
    return _per_image(ctx, calls, "Text read from image", ctx.services.ocr)


def caption_evidence(ctx: SkillContext, calls: list[Call]) -> str:
    return _per_image(ctx, calls, "Description of image", ctx.services.caption)


def detection_listing(objects: list[dict]) -> str:
    """Detected objects as prompt lines: "- label at [x1, y1, x2, y2]"."""
    return "\n".join(f"- {o['label']} at {o['bbox']}" for o in objects) or "(nothing detected)"


def detection_evidence(ctx: SkillContext, calls: list[Call]) -> str:
    def listing(image, calls, skill):
        return detection_listing(ctx.services.detect(image, calls, skill))

    return _per_image(ctx, calls, "Detected objects (label at [x1, y1, x2, y2] pixels) in image", listing)


def zoom_crop(ctx: SkillContext, calls: list[Call], focus: str = ""):
    """A magnified region of the first image chosen by the zoom service for the query (and an
    optional focus hint); None if it declines, fails, or there is no image."""
    if not ctx.images:
        return None
    question = f"{ctx.query}\n(Look especially at: {focus})" if focus else ctx.query
    try:
        return ctx.services.zoom(ctx.images[0], question, calls, ctx.skill.name)
    except ExpertError:
        return None  # the Call already records the error


def _per_image(ctx, calls, title, service) -> str:
    sections = []
    for i, image in enumerate(ctx.images, start=1):
        try:
            text = service(image, calls, ctx.skill.name).strip()
        except ExpertError as err:
            text = f"(unavailable: {err.kind})"
        sections.append(f"{title} {i}:\n{text}")
    return "\n\n".join(sections) or "(no image)"


# Level-2 specialists: one table row per sub-task, one shared pipeline.

EVIDENCE = {"ocr": ocr_evidence, "caption": caption_evidence, "detection": detection_evidence}


@dataclass(frozen=True)
class Task:
    """A Level-2 sub-task: what it is, which evidence its prompt uses (keys of EVIDENCE), what the
    zoom service should look for ('' = no zoom), and the rules for the answer."""

    title: str
    evidence: tuple[str, ...]
    zoom_focus: str
    requirements: tuple[str, ...]


def task_for(ctx: SkillContext, family: str, tasks: dict[str, Task]) -> Task:
    """The row of `tasks` for ctx.skill: its name without the family prefix and a '_skill'
    suffix, e.g. OCRBench_Text_Recognition_Skill -> text_recognition."""
    key = re.sub(r"[\s_\-]+", "_", ctx.skill.name.strip().casefold())
    key = key.removeprefix(family.casefold() + "_").removesuffix("_skill")
    if key not in tasks:
        raise ValueError(f"skill {ctx.skill.name!r} ({ctx.skill.implementation}) names no {family} sub-task; "
                         f"expected {family}_<task>[_Skill] with <task> one of {sorted(tasks)}")
    return tasks[key]


def solve_task(ctx: SkillContext, family: str, task: Task) -> SkillResult:
    """Compute only the evidence the task uses, zoom if it has a focus, then one expert call with
    the original image(s) followed by the crop."""
    calls = []
    sections = [EVIDENCE[name](ctx, calls) for name in task.evidence]
    crop = zoom_crop(ctx, calls, task.zoom_focus) if task.zoom_focus else None
    lines = [f"You are solving a {family} task: {task.title}.", "", "Question:", ctx.query]
    if crop:
        lines += ["", "The last image is a magnified crop of the first image showing " + task.zoom_focus + "."]
    if sections:
        lines += ["", "Evidence from helper tools (can be wrong; trust the image where they disagree):", *sections]
    lines += ["", "Requirements:", *(f"- {rule}" for rule in task.requirements)]
    answer = ask_expert(ctx, calls, "\n".join(lines), images=[*ctx.images, crop] if crop else ctx.images)
    return SkillResult(answer, calls, (ctx.skill.name,))
