"""Level-1 routers: pick a Level-2 child from the words of the policy's input, then run it.

Routing is by the router's route_keywords (child -> phrases): each phrase counts its whole-word,
case-insensitive occurrences in the input; the child with the highest count wins, ties go to the
child listed first, and no match at all goes to default_child. No model call is made here, and the
child runs with its own Skill (its own prompts), never the router's.
"""

import re
from dataclasses import replace

from skills import SkillResult, run_skill


def phrase_count(phrase: str, text: str) -> int:
    """Occurrences of `phrase` in `text` as whole words, ignoring case and runs of whitespace."""
    words = [re.escape(word) for word in phrase.split()]
    pattern = r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def choose_child(router, text: str) -> str:
    scores = {child: sum(phrase_count(p, text) for p in router.route_keywords.get(child, ()))
              for child in router.children}
    best = max(scores.values(), default=0)
    if best == 0:
        return router.default_child
    return next(child for child in router.children if scores[child] == best)


def route(ctx):
    router = ctx.skill
    child = ctx.registry.skills[choose_child(router, ctx.query)]
    result = run_skill(replace(ctx, skill=child))
    return SkillResult(result.text, result.calls, (router.name, *result.path))
