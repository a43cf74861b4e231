"""Counting_Problem_Solver: detection per image, the detections drawn on a copy of each image, a
zoom per image on the region that most needs a closer look (the zoom model sees the detections),
then two expert calls over [original, boxed, crop] per image: list every object, then verify the
count. Listing first makes each counted object explicit, so the second call can catch double
counts and misses instead of guessing a number (upstream's pipeline, in our words)."""

from experts import ExpertError, draw_boxes
from skills import SkillResult, ask_expert, detection_listing

ZOOM_QUESTION = """{query}

An object detector found (label at [x1, y1, x2, y2] pixels; the second image shows them drawn):
{detections}
Which single region is hardest to count -- crowded, tiny or hidden objects -- and needs magnifying?"""

ENUMERATE = """Counting question about the image(s):
{query}

For each image you get the original, a copy with an object detector's boxes drawn on it, and, when one
was needed, a magnified crop of its hardest region. The detector reported:
{detections}
It misses small or hidden objects and sometimes boxes one object twice: treat it as a hint, not as the
truth. Scan each image region by region (left to right, top to bottom) and list every object the question
asks about, one per line, with where it is. Include objects that are partly hidden, tiny or cut off at
the border, and say which ones you are unsure of. Do not give a total yet."""

VERIFY = """Counting question about the image(s):
{query}

A first pass over the images listed these objects:
{listing}

Check the list against the images: strike objects listed twice or not of the kind asked about, and add
any that were missed. Then count what remains. Reason briefly and give the final number alone on the
last line."""


def solve(ctx):
    calls, views, reports = [], [], []
    for number, image in enumerate(ctx.images, start=1):
        try:
            objects = ctx.services.detect(image, calls, ctx.skill.name)
        except ExpertError as err:  # the Call records it; count without the hint
            objects, reports = [], reports + [f"Image {number}: (detector unavailable: {err.kind})"]
        else:
            reports.append(f"Image {number}:\n{detection_listing(objects)}")
        boxed = draw_boxes(image, objects)
        try:
            question = ZOOM_QUESTION.format(query=ctx.query, detections=detection_listing(objects))
            crop = ctx.services.zoom(image, question, calls, ctx.skill.name, hint_images=(boxed,))
        except ExpertError:
            crop = None
        views += [image, boxed] + ([crop] if crop else [])
    detections = "\n".join(reports) or "(no image)"
    listing = ask_expert(ctx, calls, ENUMERATE.format(query=ctx.query, detections=detections), images=views)
    answer = ask_expert(ctx, calls, VERIFY.format(query=ctx.query, listing=listing), images=views)
    return SkillResult(answer, calls, (ctx.skill.name,))
