"""Chart_Problem_Solver: OCR, the expert names the chart type, then answers with guidance for it."""

import re

from skills import SkillResult, ask_expert, ocr_evidence

CLASSIFY = """Question about the chart in the image:
{query}

{ocr}

Is this a bar chart, a line chart or a pie chart? Reply with one word: bar, line or pie."""

GUIDANCE = {
    "bar": "Bar chart: categories run along one axis; match each bar colour to its series in the legend; "
           "read a value at the end of its bar against the value axis, or from the number printed on it.",
    "line": "Line chart: the x axis holds the categories or time points and each coloured line is one series "
            "(see the legend); read values at the marked points or against the y axis; compare slopes for "
            "trends and look for where lines cross.",
    "pie": "Pie chart: match each slice to its label or legend entry by colour; prefer percentages printed on "
           "the slices; slice sizes are shares of the whole.",
}

ANSWER = """Answer this question about the {kind} chart in the image.

Question:
{query}

{ocr}

How to read the chart: find the elements the question names in the image itself; take exact labels
and numbers from the text read from the image; when a value is not printed, estimate it from the
axis scale; compare magnitudes before computing differences or ratios.
{guidance}

Reason briefly, then give the final answer alone on the last line."""


def chart_kind(reply: str) -> str:
    """The first of bar/line/pie named in the expert's reply; bar when it names none."""
    match = re.search(r"\b(bar|line|pie)\b", reply.lower())
    return match.group(1) if match else "bar"


def solve(ctx):
    calls = []
    ocr = ocr_evidence(ctx, calls)
    kind = chart_kind(ask_expert(ctx, calls, CLASSIFY.format(query=ctx.query, ocr=ocr)))
    answer = ask_expert(ctx, calls, ANSWER.format(kind=kind, query=ctx.query, ocr=ocr, guidance=GUIDANCE[kind]))
    return SkillResult(answer, calls, (ctx.skill.name,))
