"""Toy-world skills: each one asks its expert a single question under a named task.

The message is a task header plus the policy's input, nothing else:

    Task: read_bar
    Request: what is the value of bar C?

The toy experts (toyworld.py) parse the header to know which procedure the skill asked for; how
reliable the reply is depends on whether that task and the expert both fit the question (the
competence table in toyworld.py). Routers (Grid_Router) are the generic router:route.
"""

from skills import SkillResult, ask_expert

TASK_HEADER = "Task: {task}\nRequest: {query}"


def _ask(ctx, task: str) -> SkillResult:
    calls = []
    text = ask_expert(ctx, calls, TASK_HEADER.format(task=task, query=ctx.query))
    return SkillResult(text, calls, (ctx.skill.name,))


def read_bar(ctx):
    return _ask(ctx, "read_bar")


def count_shapes(ctx):
    return _ask(ctx, "count_shapes")


def read_cell_colour(ctx):
    return _ask(ctx, "read_cell_colour")


def count_grid_rows(ctx):
    return _ask(ctx, "count_grid_rows")


def third_angle(ctx):
    return _ask(ctx, "third_angle")


def name_shape(ctx):
    return _ask(ctx, "name_shape")
