"""Perception_Problem_Solver: a zoomed crop of the first image, then one answer from the original
image(s) plus the crop."""

from skills import SkillResult, ask_expert, zoom_crop

SYSTEM = ("You look at images carefully and answer questions about what they show: colours, shapes, "
          "small text, positions and the relations between objects.")

CROP_NOTE = ("\n\nThe last image is a magnified view of one region of the first image, so you can inspect "
             "details there; the images before it show the whole scene.")

PROMPT = "{query}{crop_note}\n\nLook before you answer, and give the final answer alone on the last line."


def solve(ctx):
    calls = []
    crop = zoom_crop(ctx, calls)
    prompt = PROMPT.format(query=ctx.query, crop_note=CROP_NOTE if crop else "")
    answer = ask_expert(ctx, calls, prompt, images=[*ctx.images, crop] if crop else ctx.images, system=SYSTEM)
    return SkillResult(answer, calls, (ctx.skill.name,))
