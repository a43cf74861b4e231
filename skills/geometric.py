"""Geometric_Problem_Solver: caption + OCR, then four expert calls -- extract the figure's
structure, reconcile it with the tool evidence, solve, verify -- each seeing the image(s) and
everything settled before it (upstream's extract / fuse / solve / verify stages, in our words).

Committing to what the figure shows before any algebra, and checking the result against the
figure after it, is what the stages buy over a single "solve this" call.
"""

from skills import SkillResult, ask_expert, caption_evidence, ocr_evidence

EXTRACT = """Geometry problem about the figure in the image:
{query}

Before anyone solves it, record what the figure shows, under these six headings:
POINTS: every labelled point.
LINES & SEGMENTS: which points are joined, which lie on a line; given lengths.
ANGLES: every marked or given angle, right-angle marks, equal-angle arcs.
CIRCLES/ARCS: centres, radii, arcs and what they subtend.
ANNOTATIONS: tick marks, numbers and variables, and what each one measures.
RELATIONSHIPS: parallel, perpendicular, tangent, collinear, congruent or similar parts.
Do not solve the problem."""

FUSE = """Geometry problem about the figure in the image:
{query}

Your structured reading of the figure:
{extraction}

What helper tools report (they can be wrong; trust the image where they disagree):
{caption}

{ocr}

Compare the three sources. Name every conflict (a label, a number, a relation) and settle it by
looking at the image again. Then write one consolidated description of the figure."""

SOLVE = """Solve this geometry problem.

Problem:
{query}

The figure, as settled after checking the image:
{figure}

Restate what is asked, list the facts you use, name each theorem or formula as you apply it and
derive the result step by step. End with a provisional answer."""

VERIFY = """Geometry problem:
{query}

The figure, as settled:
{figure}

A proposed solution:
{solution}

Check it before it is final:
DIMENSIONAL ANALYSIS: do the units and the kind of quantity fit what is asked?
EXTREME CASE TESTING: does the reasoning survive a limiting or special configuration?
CROSS-METHOD VERIFICATION: does a second route (another theorem, coordinates) give the same value?
PLAUSIBILITY CHECK: does the value fit the figure's proportions?
Correct any error you find. Write the final answer alone on the last line."""


def solve(ctx):
    calls = []
    caption = caption_evidence(ctx, calls)
    ocr = ocr_evidence(ctx, calls)
    extraction = ask_expert(ctx, calls, EXTRACT.format(query=ctx.query))
    figure = ask_expert(ctx, calls, FUSE.format(query=ctx.query, extraction=extraction, caption=caption, ocr=ocr))
    solution = ask_expert(ctx, calls, SOLVE.format(query=ctx.query, figure=figure))
    answer = ask_expert(ctx, calls, VERIFY.format(query=ctx.query, figure=figure, solution=solution))
    return SkillResult(answer, calls, (ctx.skill.name,))
