"""Science_Problem_Solver: caption + OCR + a zoomed crop, then one answer from all the evidence."""

from skills import SkillResult, ask_expert, caption_evidence, ocr_evidence, zoom_crop

PROMPT = """Answer this science question about the image(s).

Question:
{query}

Evidence:
- the image(s){crop_note};
- a description and the text of each image from helper tools:

{caption}

{ocr}

The helper tools can be wrong; where they disagree with the image, trust the image. Name the
scientific principle that applies, reason concisely, and give the final answer alone on the last line."""

CROP_NOTE = ", and after them a magnified crop of the region of the first image that matters most"
ZOOM_FOCUS = "the part of the figure the science question depends on (labels, scales, small parts)"


def solve(ctx):
    calls = []
    caption = caption_evidence(ctx, calls)
    ocr = ocr_evidence(ctx, calls)
    crop = zoom_crop(ctx, calls, ZOOM_FOCUS)
    prompt = PROMPT.format(query=ctx.query, crop_note=CROP_NOTE if crop else "", caption=caption, ocr=ocr)
    answer = ask_expert(ctx, calls, prompt, images=[*ctx.images, crop] if crop else ctx.images)
    return SkillResult(answer, calls, (ctx.skill.name,))
