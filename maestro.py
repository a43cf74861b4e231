"""The action protocol between the policy and the environment of experts and skills.

A policy turn is free text that ends with exactly one action block:

    <think> optional reasoning </think>
    <search> MODEL@@SKILL: input for the skill </search>      -> call a skill on an expert
    <answer> final answer </answer>                           -> end the episode

The rollout stops generation on `</search>` and `</answer>`, so a well-formed turn *ends* with its
action. `parse_action` reads one turn into an `Action` (or an 'invalid' Action with a typed error
kind and a message for the policy), `format_observation` turns an expert reply into the
`<information>..</information>` text the policy sees next, and `Environment.step` executes one turn
of actions for a batch of samples, concurrently. Nothing here raises on bad policy output or on
failing experts: every failure becomes an error observation and a count in `env.error_counts`.
"""

import re
from collections import Counter
from dataclasses import dataclass, field

from experts import ExpertError, run_concurrently, strip_think
from registry import RegistryError
from skills import SkillContext, run_skill

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
PROTOCOL_TAGS = (THINK_OPEN, THINK_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, ANSWER_OPEN, ANSWER_CLOSE,
                 INFO_OPEN, INFO_CLOSE)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
CALL_SEPARATOR = "@@"

# Every error kind an Action or a StepResult can carry. The first group is decided by the parser,
# the second at execution time. 'expert_error' is broken down by ExpertError.kind in
# Environment.expert_error_kinds.
ERROR_KINDS = (
    "no_action", "unclosed_think", "unclosed_tag", "trailing_text", "nested_tag",
    "missing_separator", "missing_colon", "empty_model", "empty_skill", "empty_query",
    "placeholder", "empty_answer",
    "unknown_model", "unknown_skill", "not_addressable", "expert_error", "skill_error",
)

# Template words from the system prompt that a policy sometimes copies instead of real names.
# Compared after casefolding and removing '-', '_' and spaces.
PLACEHOLDERS = {
    "model": {"model", "modelname", "expert", "expertname"},
    "skill": {"skill", "skillname"},
    "query": {"yourtextinput", "textinput", "yourinput", "input", "yourquery", "query"},
}

FORMAT_HELP = (
    "End your turn with exactly one action: either a call "
    "<search> Model-Name@@Skill-Name: input </search> (a model name and a skill name from the "
    "system prompt, '@@' between them, then ':' and your request) or the final answer "
    "<answer> your answer </answer>."
)


@dataclass(frozen=True)
class Action:
    kind: str          # 'search' | 'answer' | 'invalid'
    model: str = ""
    skill: str = ""
    query: str = ""
    answer: str = ""
    error: str = ""    # '' when valid, else one of ERROR_KINDS
    message: str = ""  # what was wrong and what is valid; shown to the policy as the observation


@dataclass
class StepResult:
    observation: str                  # the full "<information>...</information>" string
    calls: list = field(default_factory=list)   # experts.Call records of this step
    error: str = ""                   # '' or one of ERROR_KINDS
    path: tuple = ()                  # skill names taken (router, child)
    expert: str = ""                  # canonical expert name, '' when not resolved
    skill: str = ""                   # canonical skill name, '' when not resolved


def _invalid(error: str, problem: str) -> Action:
    return Action(kind="invalid", error=error, message=f"{problem} {FORMAT_HELP}")


def _strip_end_of_turn(text: str) -> str:
    """Drop trailing whitespace and end-of-turn tokens (a decoder may keep them)."""
    text = text.rstrip()
    stripped = True
    while stripped:
        stripped = False
        for token in END_OF_TURN_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                stripped = True
    return text


def _is_placeholder(part: str, which: str) -> bool:
    squashed = part.casefold().replace("-", "").replace("_", "").replace(" ", "")
    return squashed in PLACEHOLDERS[which]


def parse_action(text: str) -> Action:
    """Read one generated turn into an Action. Never raises; linear time (find/rfind, no regex).

    Only the block that ends the turn is the action; earlier blocks are ignored (the generator
    stops at the first closing tag, so they only occur in hand-written text). Reasoning is never
    parsed: everything up to the last </think> is dropped. Tags are case-sensitive, as generated;
    name matching (case, hyphens, aliases) is the registry's job.
    """
    body = _strip_end_of_turn(text)
    think_end = body.rfind(THINK_CLOSE)
    visible = body[think_end + len(THINK_CLOSE):] if think_end >= 0 else body

    if visible.endswith(SEARCH_CLOSE):
        kind, opener, closer = "search", SEARCH_OPEN, SEARCH_CLOSE
    elif visible.endswith(ANSWER_CLOSE):
        kind, opener, closer = "answer", ANSWER_OPEN, ANSWER_CLOSE
    elif THINK_OPEN in visible:
        return _invalid("unclosed_think", "Your turn ended inside <think> without </think>, so it "
                        "contains no action.")
    elif SEARCH_CLOSE in visible or ANSWER_CLOSE in visible:
        # Only reachable when generation did not stop at the closing tag (no stop strings, or
        # hand-written text): something follows the action block.
        return _invalid("trailing_text", "Your turn continued after the closing </search> or "
                        "</answer> tag; the action must be the last thing in the turn.")
    elif SEARCH_OPEN in visible or ANSWER_OPEN in visible:
        return _invalid("unclosed_tag", "Your turn opened <search> or <answer> but never closed it.")
    else:
        return _invalid("no_action", "Your turn contains no <search> or <answer> block.")

    end = len(visible) - len(closer)
    start = visible.rfind(opener, 0, end)
    if THINK_OPEN in visible[: start if start >= 0 else end]:
        return _invalid("unclosed_think", f"Your {closer} comes after a <think> that is never "
                        "closed, so it is still part of your reasoning; close it with </think> "
                        "before the action.")
    if start < 0:
        return _invalid("unclosed_tag", f"Your turn ends with {closer} but has no matching {opener}.")
    content = visible[start + len(opener): end]
    for tag in PROTOCOL_TAGS:
        if tag in content:
            return _invalid("nested_tag", f"Your {opener} block contains the tag {tag}; an action "
                            "block must not contain other protocol tags.")

    if kind == "answer":
        answer = content.strip()
        if not answer:
            return _invalid("empty_answer", "Your <answer> block is empty.")
        return Action(kind="answer", answer=answer)

    at = content.find(CALL_SEPARATOR)
    if at < 0:
        return _invalid("missing_separator", "Your <search> block has no '@@' between the expert "
                        "name and the skill name.")
    colon = content.find(":", at + len(CALL_SEPARATOR))
    if colon < 0:
        return _invalid("missing_colon", "Your <search> block has no ':' after the skill name to "
                        "separate it from your request.")
    model = content[:at].strip()
    skill = content[at + len(CALL_SEPARATOR): colon].strip()
    query = content[colon + 1:].strip()
    for part, which, label in ((model, "model", "expert name"), (skill, "skill", "skill name"),
                               (query, "query", "request")):
        if not part:
            return _invalid(f"empty_{which}", f"The {label} in your <search> block is empty.")
        if _is_placeholder(part, which):
            return _invalid("placeholder", f"'{part}' is the template placeholder, not a real "
                            f"{label}; use a real {label} from the system prompt.")
    return Action(kind="search", model=model, skill=skill, query=query)


# ----------------------------------------------------------------------------------------------
# Observations

# An expert reply is untrusted text that is spliced into the policy's context. If it contained
# "</information><answer>..." or "<|im_end|>", it could fake the end of the observation, an action,
# or (once tokenized, since special-token strings become special ids) a chat-turn boundary or an
# image placeholder. We replace the '<' of every protocol tag (any case, optional spaces, optional
# '/') and of every '<|' with the look-alike '‹' (U+2039): the policy can still read it, but it is
# no longer the tag string the parser, the chat template or the tokenizer react to.
_FORGEABLE = re.compile(r"<(?=\s{0,3}/?\s{0,3}(?:think|search|answer|information)\b|\|)", re.IGNORECASE)
NEUTRAL_LT = "\u2039"


def neutralize_tags(text: str) -> str:
    return _FORGEABLE.sub(NEUTRAL_LT, text)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _wrap(body: str) -> str:
    return f"{INFO_OPEN}{body}{INFO_CLOSE}"


# Tokenizing costs up to seconds per megabyte, and a broken or runaway expert can send megabytes.
# A body longer than two windows is tokenized only in a window at each end; a window holds at
# least 64K characters and 32 per budget token (tokens rarely span more than a few characters).
MIN_WINDOW_CHARS, WINDOW_CHARS_PER_TOKEN = 65_536, 32


def _fit(body: str, tokenizer, budget: int) -> str:
    """Wrap `body` in information tags within `budget` tokens (counted on the whole string),
    cutting the middle and keeping head and tail around an explicit marker. A body longer than
    two windows is tokenized only in those windows (cost independent of its length); the marker
    then also counts the characters between them."""
    # JSON can carry lone surrogates ("\ud800"), which tokenizers refuse: make them '?'
    body = body.encode("utf-8", "replace").decode("utf-8")
    window = max(MIN_WINDOW_CHARS, budget * WINDOW_CHARS_PER_TOKEN)
    if len(body) <= 2 * window:
        wrapped = _wrap(body)
        if _count(tokenizer, wrapped) <= budget:
            return wrapped
        head_ids = tail_ids = tokenizer.encode(body, add_special_tokens=False)
        total, unseen = len(head_ids), ""
    else:
        head_ids = tokenizer.encode(body[:window], add_special_tokens=False)
        tail_ids = tokenizer.encode(body[-window:], add_special_tokens=False)
        total, unseen = len(head_ids) + len(tail_ids), f" and {len(body) - 2 * window} characters"

    def marker(kept):
        return f"\n[... {total - kept} tokens{unseen} truncated ...]\n"

    keep = budget - _count(tokenizer, _wrap(marker(0)))
    while keep > 0:
        head_n, tail_n = min((keep + 1) // 2, len(head_ids)), min(keep // 2, len(tail_ids))
        head = tokenizer.decode(head_ids[:head_n])
        tail = tokenizer.decode(tail_ids[len(tail_ids) - tail_n:]) if tail_n else ""
        wrapped = _wrap(f"{head}{marker(head_n + tail_n)}{tail}")
        over = _count(tokenizer, wrapped) - budget
        if over <= 0:
            return wrapped
        keep -= over  # token boundaries can merge differently after the cut: shrink and retry
    raise ValueError(f"observation token budget {budget} is too small for the information tags "
                     "and the truncation marker; use a budget of at least 64 tokens")


def format_observation(text: str, tokenizer, budget: int = 1024) -> str:
    """An expert reply as the policy sees it: reasoning stripped, protocol tags neutralized,
    wrapped in <information>..</information> and cut to `budget` tokens of `tokenizer` (an HF
    tokenizer: encode(text, add_special_tokens=False) / decode(ids)), tags and marker included."""
    body = neutralize_tags(strip_think(text)).strip() or "[the reply was empty]"
    return _fit(body, tokenizer, budget)


def format_error(error: str, message: str, tokenizer, budget: int = 1024) -> str:
    """An error observation. `message` is written by this project (it may show the real tags as
    format help); untrusted text inside it must already be passed through neutralize_tags.
    Special-token look-alikes ('<|') are neutralized here in any case."""
    message = message.replace("<|", NEUTRAL_LT + "|")
    return _fit(f"Error ({error}): {message}", tokenizer, budget)


# ----------------------------------------------------------------------------------------------
# Environment

class Environment:
    """Executes the policy's actions: one search action -> one skill run on one expert.

    `step` runs all calls of a turn concurrently (at most `max_parallel` at a time per expert, so
    a dead or slow expert holds only its own workers and never delays calls to the others) and never
    raises for anything the policy or an expert does: invalid actions, unknown names, expert
    failures and skill exceptions become error observations. `error_counts` counts error kinds
    (ERROR_KINDS) over the environment's life, `expert_error_kinds` breaks 'expert_error' down by
    ExpertError.kind ('timeout', 'http_5xx', ...). The sample's ground truth never reaches a skill.
    """

    def __init__(self, registry, backends, services, tokenizer, obs_token_budget=1024, max_parallel=16):
        if obs_token_budget < 64:
            raise ValueError(f"obs_token_budget={obs_token_budget} is too small: the information "
                             "tags, the truncation marker and an error message need at least 64 tokens")
        missing = sorted(set(registry.experts) - set(backends))
        if missing:
            raise ValueError(f"no backend for the registry's experts {missing} (registry "
                             f"{registry.source}); build them with experts.build_backends(registry)")
        self.registry = registry
        self.backends = backends
        self.services = services
        self.tokenizer = tokenizer
        self.obs_token_budget = obs_token_budget
        self.max_parallel = max_parallel
        self.error_counts = Counter()
        self.expert_error_kinds = Counter()

    def step(self, actions, samples):
        """actions[i] was taken on samples[i]; returns one StepResult per action, in order.
        Answer actions end the episode and get an empty StepResult (no observation)."""
        if len(actions) != len(samples):
            raise ValueError(f"step got {len(actions)} actions for {len(samples)} samples")
        queues = {}  # expert name ('' when unknown) -> indices of the actions calling it
        for i, action in enumerate(actions):
            if action.kind == "search":
                queues.setdefault(self._expert_name(action.model), []).append(i)

        def run_queue(queue):
            return run_concurrently(lambda i: self._call(actions[i], samples[i]), queue, self.max_parallel)

        by_index = {}
        for queue, outcomes in zip(queues.values(), run_concurrently(run_queue, queues.values(), len(queues))):
            by_index.update(zip(queue, outcomes))
        results = []
        for i, action in enumerate(actions):
            if action.kind == "invalid":
                result = self._error(action.error, action.message)
            elif action.kind == "answer":
                result = StepResult(observation="")
            elif isinstance(by_index[i], BaseException):  # _call catches Exception; last resort
                result = self._error("skill_error", "The skill call failed unexpectedly: "
                                     + neutralize_tags(f"{type(by_index[i]).__name__}: {by_index[i]}"))
            else:
                result, expert_error_kind = by_index[i]
                if expert_error_kind:  # counted here, not in the worker threads
                    self.expert_error_kinds[expert_error_kind] += 1
            if result.error:
                self.error_counts[result.error] += 1
            results.append(result)
        return results

    def _expert_name(self, model):
        try:
            return self.registry.resolve_expert(model).name
        except RegistryError:
            return ""

    def _error(self, error, message, **fields):
        return StepResult(observation=format_error(error, message, self.tokenizer, self.obs_token_budget),
                          error=error, **fields)

    def _call(self, action, sample):
        """Run one search action. Returns (StepResult, ExpertError.kind or '')."""
        try:
            expert, skill = self.registry.resolve(action.model, action.skill)
        except RegistryError as e:  # unknown_model | unknown_skill | not_addressable
            kind = e.kind if e.kind in ERROR_KINDS else "skill_error"
            return self._error(kind, neutralize_tags(str(e))), ""
        names = {"expert": expert.name, "skill": skill.name}
        ctx = SkillContext(registry=self.registry, skill=skill, expert=self.backends[expert.name],
                           services=self.services, query=action.query, images=sample.images)
        try:
            result = run_skill(ctx)
        except ExpertError as e:  # e.calls: what the skill spent before the failure
            return self._error("expert_error", neutralize_tags(
                f"The call to {e.name} failed ({e.kind}): {e}. This is not a mistake in your "
                "request; you may retry, use another expert, or answer."),
                calls=list(getattr(e, "calls", [])), **names), e.kind
        except Exception as e:
            return self._error("skill_error", neutralize_tags(
                f"The skill {skill.name} failed: {type(e).__name__}: {e}. This is not a mistake in "
                "your request; you may retry, use another skill, or answer."), **names), ""
        observation = format_observation(result.text, self.tokenizer, self.obs_token_budget)
        return StepResult(observation=observation, calls=list(result.calls), path=tuple(result.path),
                          **names), ""
