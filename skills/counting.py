"""Counting_Problem_Solver: detection, the expert lists every object (detections as a hint), then
verifies the count against its own list. Listing first makes each counted object explicit, so the
second call can catch double counts and misses instead of guessing a number."""

from skills import SkillResult, ask_expert, detection_evidence

ENUMERATE = """Counting question about the image(s):
{query}

An object detector reported the following. It misses small or hidden objects and sometimes counts one
object twice, so treat it as a hint, not as the truth:
{detections}

Scan the image region by region (left to right, top to bottom) and list every object the question asks
about, one per line, with where it is. Include objects that are partly hidden, tiny or cut off at the
border, and say which ones you are unsure of. Do not give a total yet."""

VERIFY = """Counting question about the image(s):
{query}

A first pass over the image listed these objects:
{listing}

Check the list against the image: strike objects listed twice or not of the kind asked about, and add
any that were missed. Then count what remains. Reason briefly and give the final number alone on the
last line."""


def solve(ctx):
    calls = []
    detections = detection_evidence(ctx, calls)
    listing = ask_expert(ctx, calls, ENUMERATE.format(query=ctx.query, detections=detections))
    answer = ask_expert(ctx, calls, VERIFY.format(query=ctx.query, listing=listing))
    return SkillResult(answer, calls, (ctx.skill.name,))
