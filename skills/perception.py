"""Perception_Problem_Solver: a zoomed crop of the first image, then one answer from the first
image plus the crop (upstream showed its perception expert the first image only)."""

from skills import SkillResult, ask_expert, zoom_crop

SYSTEM = ("You look at images carefully and answer questions about what they show: colours, shapes, "
          "small text, positions and the relations between objects.")

CROP_NOTE = ("\n\nThe second image is a magnified view of one region of the first, so you can inspect "
             "details there; the first shows the whole scene.")

PROMPT = "{query}{crop_note}\n\nLook before you answer, and give the final answer alone on the last line."


def solve(ctx):
    calls = []
    crop = zoom_crop(ctx, calls)
    prompt = PROMPT.format(query=ctx.query, crop_note=CROP_NOTE if crop else "")
    first = list(ctx.images[:1])
    answer = ask_expert(ctx, calls, prompt, images=first + [crop] if crop else first, system=SYSTEM)
    return SkillResult(answer, calls, (ctx.skill.name,))
