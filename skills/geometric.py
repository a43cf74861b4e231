"""Geometric_Problem_Solver: caption + OCR, the expert describes the figure, then solves with it.

Describing before solving makes the expert commit to what the figure shows (labels, lengths,
angles, relations) and reconcile it with the tool evidence before any algebra starts.
"""

from skills import SkillResult, ask_expert, caption_evidence, ocr_evidence

DESCRIBE = """Geometry problem about the figure in the image:
{query}

Evidence from helper tools (they can be wrong; where they disagree with the image, trust the image):
{caption}

{ocr}

Before anyone solves the problem, describe the figure precisely:
- every labelled point, and which points are joined by segments or lie on lines and circles;
- every given length, angle, arc and tick or right-angle mark, attached to what it measures;
- relations stated or drawn: parallel, perpendicular, tangent, equal, collinear, inscribed.
Point out anything the tool evidence gets wrong. Do not solve the problem."""

SOLVE = """Solve this geometry problem.

Problem:
{query}

Figure, as described after checking the image:
{figure}

Text read from the image:
{ocr}

State what is asked, list the facts you use, name each theorem or formula when you apply it, and
compute step by step. Check that the result fits the figure (sign, units, rough size). End with a
line of the form "Answer: <final answer>"."""


def solve(ctx):
    calls = []
    caption = caption_evidence(ctx, calls)
    ocr = ocr_evidence(ctx, calls)
    figure = ask_expert(ctx, calls, DESCRIBE.format(query=ctx.query, caption=caption, ocr=ocr))
    answer = ask_expert(ctx, calls, SOLVE.format(query=ctx.query, figure=figure, ocr=ocr))
    return SkillResult(answer, calls, (ctx.skill.name,))
