"""VLMsAreBlind Level-2 skills (synthetic diagrams), reached through the diagram-reasoning router.

One solve serves all five children; the child's name picks its row below. Every task zooms on the
region that matters; only the highlighted-character task also reads text.
"""

from skills import Task, solve_task, task_for

TASKS = {
    "circle_contact_overlap_judge": Task(
        "judging whether two circles touch or overlap",
        (), "the place where the two circles come closest",
        ("Decide between separated (a visible gap), touching (one shared point) and overlapping.",
         "Answer Yes or No only, as the question asks.")),
    "intersection_route_counting": Task(
        "counting line crossings or coloured routes",
        (), "the crossings between the lines, or the paths between the named stations",
        ("Count only true crossings between differently coloured lines, or only complete routes of one colour.",
         "Return only the final number.")),
    "grid_structure_parsing": Task(
        "counting the rows and columns of a grid",
        (), "the grid dividers",
        ("Count rows and columns from the divider lines, ignoring cell contents; cross-check with the cells.",
         "Return only the final answer in the format the question asks for.")),
    "highlighted_character_recognition": Task(
        "reading the character circled by a red oval",
        ("ocr",), "the red oval and the character inside it",
        ("Find the red oval and read the single character centred in it; keep its case.",
         "Return only that character.")),
    "geometric_shape_counting": Task(
        "counting shapes in a diagram",
        (), "the shapes to be counted, especially nested or touching ones",
        ("Identify the shape asked about and count complete instances; for nested squares count closed contours.",
         "Return only the final number.")),
}


def solve(ctx):
    return solve_task(ctx, "VLMsAreBlind", task_for(ctx, "VLMsAreBlind", TASKS))
