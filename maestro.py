"""The protocol between the policy and the ensemble, written once: tags, the call grammar, the
parser, the observations, the prompt that teaches it, and upstream's variant of the turn loop.

A policy turn is free text that ends with exactly one action block:

    <think> optional reasoning </think>
    <search> MODEL@@SKILL: input for the skill </search>      -> call a skill on an expert
    <answer> final answer </answer>                           -> end the episode

Generation stops at `</search>` and `</answer>` (STOP_STRINGS), so a well-formed turn *ends* with
its action. `parse_action` reads one turn into an `Action` (or an 'invalid' Action with a typed
error kind and a message for the policy); `format_observation` turns an expert reply into the
`<information>..</information>` text the policy sees next; `system_prompt` renders a registry into
the instructions that teach all this. Every other module imports these names: no tag string and no
call separator is spelled anywhere else. This module imports nothing of the project.
"""

import functools
import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
PROTOCOL_TAGS = (THINK_OPEN, THINK_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, INFO_OPEN, INFO_CLOSE,
                 ANSWER_OPEN, ANSWER_CLOSE)  # in this order they are the first added tokens of a from-scratch tokenizer
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
PROTOCOLS = ("ours", "upstream")  # the turn loop: ours (rollout.py) or upstream's (upstream_edit)
CALL_SEPARATOR = "@@"
STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)

# Every error kind an Action or a StepResult can carry. The first group is decided by the parser,
# the second at execution time; an 'expert_error' keeps its ExpertError.kind in the failed Call
# (eval.summarize reports them as expert_errors).
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


def format_call(expert: str, skill: str, query: str, spaced: bool = False) -> str:
    """The action block of a call: compact as demonstrations write it, spaced ("<search> E@@S: q
    </search>") as the system prompt shows it."""
    pad = " " if spaced else ""
    return f"{SEARCH_OPEN}{pad}{expert}{CALL_SEPARATOR}{skill}: {query}{pad}{SEARCH_CLOSE}"


def format_answer(answer: str) -> str:
    return f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def pair_name(expert: str, skill: str) -> str:
    """An (expert, skill) pair as one key, spelled as in a call: "Expert@@Skill"."""
    return f"{expert}{CALL_SEPARATOR}{skill}"


@dataclass(frozen=True)
class Action:
    kind: str          # 'search' | 'answer' | 'invalid'
    model: str = ""
    skill: str = ""
    query: str = ""
    answer: str = ""
    error: str = ""    # '' when valid, else one of ERROR_KINDS
    message: str = ""  # what was wrong and what is valid; shown to the policy as the observation


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
        # Something follows the action block: generation did not stop at the closing tag (no stop
        # strings, or hand-written text); rollout.close_turn cuts what a stop token merged past it.
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


def after_reasoning(text: str) -> str:
    """What a turn says outside its reasoning: the text after its last </think>."""
    return text[text.rfind(THINK_CLOSE) + len(THINK_CLOSE):] if THINK_CLOSE in text else text


def answer_blocks(text: str) -> int:
    """How many answer blocks a turn opens outside its reasoning (the format term wants one in all)."""
    return after_reasoning(text).count(ANSWER_OPEN)


def answer_of(actions) -> str | None:
    """The policy's final answer: the content of its last answer action, None if it never answered."""
    answers = [a.answer for a in actions if a.kind == "answer"]
    return answers[-1] if answers else None


def strip_think(text: str) -> str:
    """Remove <think>..</think> blocks, a dangling reasoning prefix that ends in </think> without an
    opening tag (templates that open the think block in the prompt), and an unclosed trailing
    <think> (a reply cut off while reasoning). Linear time."""
    first_close, first_open = text.find("</think>"), text.find("<think>")
    if first_close >= 0 and (first_open < 0 or first_close < first_open):
        text = text[first_close + len("</think>"):]
    kept, pos = [], 0
    while True:
        start = text.find("<think>", pos)
        if start < 0:
            kept.append(text[pos:])
            break
        kept.append(text[pos:start])
        end = text.find("</think>", start)
        if end < 0:
            break
        pos = end + len("</think>")
    return "".join(kept)


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


def reply_of(observation: str) -> str:
    """The text inside an observation's <information>..</information>."""
    return observation.removeprefix(INFO_OPEN).removesuffix(INFO_CLOSE).strip()


_REPLY_ANSWER = re.compile(f"[<{NEUTRAL_LT}]{re.escape(ANSWER_OPEN[1:])}(.*?)[<{NEUTRAL_LT}]{re.escape(ANSWER_CLOSE[1:])}",
                           re.S)


def answer_in_reply(reply: str) -> str:
    """What a reply answers: the last non-empty line of its last non-empty answer block when it has
    answer blocks ("" when they are all empty; an expert that wraps its answer; in an observation
    the tags are disarmed), else of the whole reply (every skill asks its expert to end with the
    answer alone on a line; a toy expert's reply is that line alone)."""
    blocks = _REPLY_ANSWER.findall(reply)
    text = next((block for block in reversed(blocks) if block.strip()), "") if blocks else reply
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


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
    """An expert reply (its reasoning already stripped by the skill, skills.ask_expert) as the
    policy sees it: protocol tags neutralized, wrapped in <information>..</information> and cut to
    `budget` tokens of `tokenizer` (an HF tokenizer: encode(text, add_special_tokens=False) /
    decode(ids)), tags and marker included."""
    body = neutralize_tags(text).strip() or "[the reply was empty]"
    return _fit(body, tokenizer, budget)


UPSTREAM_OBSERVATION_CHARS = 1000  # upstream kept the last 1000 characters of a reply, as they were


def format_upstream_observation(text: str) -> str:
    """An expert reply as upstream showed it: its last 1000 characters, reasoning and tags left as
    they are (an expert's <answer> reaches the policy), wrapped in <information>..</information>."""
    return f"{INFO_OPEN}{text[-UPSTREAM_OBSERVATION_CHARS:]}{INFO_CLOSE}"


def format_error(error: str, message: str, tokenizer, budget: int = 1024) -> str:
    """An error observation. `message` is written by this project (it may show the real tags as
    format help); untrusted text inside it must already be passed through neutralize_tags.
    Special-token look-alikes ('<|') are neutralized here in any case."""
    message = message.replace("<|", NEUTRAL_LT + "|")
    return _fit(f"Error ({error}): {message}", tokenizer, budget)


# ----------------------------------------------------------------------------------------------
# The prompt that teaches the protocol, rendered from a registry (registry.Registry)

DEFAULT_PREAMBLE = (
    "You are an orchestrator. You answer questions about images by delegating the visual work to "
    "expert models. Every call names one expert model and one skill; the skill is the procedure "
    "the expert follows to study the image. In each turn do exactly one of two things: think "
    "briefly about which model and skill fit the question and make one call, or give the final "
    "answer. Do not try to solve the problem yourself.")


def _example_expert(registry, skill):
    """The oracle's expert for this skill when it is advertised, else the first advertised."""
    for expert_name, skill_name in registry.oracle.values():
        if skill_name == skill.name and registry.experts[expert_name].advertised:
            return registry.experts[expert_name]
    return registry.advertised_experts()[0]


def _skill_guideline(registry, skill) -> str:
    line = f"- {skill.name}: {skill.description}"
    if skill.children:
        line += "\n  It hands your request to one of its sub-skills, chosen from your wording:"
        for child in map(registry.skills.get, skill.children):
            direct = " (also callable directly)" if child.addressable else ""
            line += f"\n  * {child.name}{direct}: {child.description}"
    return line


def system_prompt(registry) -> str:
    """The policy's system prompt, rendered from the registry's advertised entries and prompt options."""
    options = registry.prompt_options
    experts, skills = registry.advertised_experts(), registry.advertised_skills()
    sections = [options["preamble"] or DEFAULT_PREAMBLE]
    if options["guidelines"]:
        sections.append("SKILLS (pick the one that matches the question type):\n"
                        + "\n".join(_skill_guideline(registry, s) for s in skills))
        sections.append("MODELS (pick the one whose speciality matches):\n"
                        + "\n".join(f"- {e.name}: {e.description}" for e in experts))
    calls = options["max_calls"]
    # a card comes before its name: under causal attention the name's tokens can then see their card
    card = lambda name, text: f"{text or 'no card'}: {name}" if options["cards"] else name  # noqa: E731
    model_names = ", ".join(card(e.name, e.speciality) for e in experts)
    skill_names = ", ".join(card(s.name, s.task) for s in skills)
    template = format_call("Model-Name", "Skill-Name", "input", spaced=True)
    if options["brief"]:
        sections.append("\n".join([f"Models: {model_names}", f"Skills: {skill_names}",
                                   f"Call {template} (at most {calls} calls), then {ANSWER_OPEN} ... {ANSWER_CLOSE}"]))
        return "\n\n".join(sections)
    calling = [
        "CALL FORMAT. To call an expert, write exactly one line:", template,
        f"Model-Name must be one of: {model_names}",
        f"Skill-Name must be one of: {skill_names}",
        "Copy both names exactly and call one model with one skill. The input is a concrete "
        "request in your own words, usually the question itself; the image reaches the expert "
        "automatically. Never write placeholders or repeat the skill descriptions.",
    ]
    examples = [format_call(_example_expert(registry, s).name, s.name, s.example, spaced=True)
                for s in skills if s.example]
    if options["examples"] and examples:
        calling += ["Examples:", *examples]
    sections.append("\n".join(calling))
    sections.append(
        f"RESULTS. The expert's reply comes back inside {INFO_OPEN} ... {INFO_CLOSE}. Then "
        "either call again (another model, another skill, or a sharper request) or answer. "
        f"You may make at most {calls} call{'s' if calls != 1 else ''}.")
    sections.append(
        f"ANSWER. When you know the answer, write it inside {ANSWER_OPEN} ... {ANSWER_CLOSE}: only the "
        "answer, as short as possible (a letter, a number, a name), with no explanation "
        f"outside the tags, e.g. {format_answer('B')} or {format_answer('11.23')}.")
    return "\n\n".join(sections)


def user_prompt(registry, question: str) -> str:
    """The question followed by the planning instruction (prompt option user_suffix)."""
    suffix = registry.prompt_options["user_suffix"]
    return f"{question}\n\n{suffix}" if suffix else question


# ----------------------------------------------------------------------------------------------
# Where a call names its expert and its skill (the routing choices the barrier and the anchor see)

def token_at(tokenizer, ids, char_offset):
    """Index of the token of `ids` whose decoded text covers character `char_offset` (binary search
    over incrementally decoded prefixes)."""
    low, high = 0, len(ids) - 1
    while low < high:
        middle = (low + high) // 2
        if len(tokenizer.decode(ids[:middle + 1])) > char_offset:
            high = middle
        else:
            low = middle + 1
    return low


def choice_tokens(tokenizer, text, ids, action, names):
    """The routing choices of the search `action` parsed from `text` (the decoded `ids`):
    [(index into ids of a choice token, kind, candidates)], at most one for the expert and one for
    the skill. names: {"expert": [...], "skill": [...]}, the advertised names, each spelled in place
    of the chosen one in this very call (a BPE tokenizer spells a name after its context: Qwen's
    ' Chart' after '<search> ', 'Chart' after '<search>'). The choice token is the last token of the
    chosen spelling where the names that share its tokens before it part: for expert-63 among
    expert-64 and expert-71 (digits split) the '3'; for Read_Bar among Read_Bar_Fast the token after
    '_Bar'. candidates: the distinct ids those names have there. A name no other parts from (the only
    one advertised) makes no choice."""
    opener = text.rfind(SEARCH_OPEN)
    choices = []
    for kind, name, at in zip(("expert", "skill"), (action.model, action.skill), name_offsets(text, action)):
        # the call up to the whitespace after the name (included): no pretoken runs on past it
        before, after = text[opener:at], re.match(r"\S*\s*", text[at + len(name):]).group()
        chosen = _spelled(tokenizer, before + name + after)
        spellings = [_spelled(tokenizer, before + other + after) for other in names[kind]]
        choice = None
        for index in range(token_at(tokenizer, chosen, len(before)), len(chosen)):
            there = {spelling[index] for spelling in spellings
                     if spelling[:index] == chosen[:index] and len(spelling) > index}
            if len(there) > 1:
                choice = index, tuple(sorted(there))
        if choice:
            start = opener + len(tokenizer.decode(chosen[:choice[0]]))  # where that token begins in text
            choices.append((token_at(tokenizer, ids, start), kind, choice[1]))
    return choices


@functools.lru_cache(maxsize=4096)
def _spelled(tokenizer, text):
    """The token ids of `text` tokenized alone, as a tuple (cached: a call's names recur)."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def name_offsets(text, action):
    """Character offsets of the expert name and the skill name of a parsed search action in `text`."""
    opener = text.rfind(SEARCH_OPEN)
    model_at = text.find(action.model, opener + len(SEARCH_OPEN))
    skill_at = text.find(action.skill, text.find(CALL_SEPARATOR, model_at + len(action.model)))
    return model_at, skill_at


# ----------------------------------------------------------------------------------------------
# Upstream's turn loop, as text rules (rollout.py applies them to tokens)

UPSTREAM_GLUE = ("<|im_start|>user", "<|im_end|>")  # upstream's bare observation turn: no newline, no assistant header


def _last_block(text, opener, closer):
    """The last complete opener..closer block of text (the closer nearest its opener), or None."""
    blocks = re.findall(re.escape(opener) + ".*?" + re.escape(closer), text, re.S)
    return blocks[-1] if blocks else None


KEEP_RAW = object()  # upstream_edit: keep the generation as it is


def upstream_edit(text, generation, tokenizer, reasoning_tail=200):
    """What upstream's turn loop kept of a generated turn (`text`: special tokens skipped), as
    text to re-encode; None when it dropped the generation (the turn is used up, the next one is
    sampled from the same context); KEEP_RAW when it kept the generation as it is.
    generation 0: the last `reasoning_tail` tokens before the first <search> and the span from it to
    the last </search> (dropped without a complete search). Later generations lose everything up to
    the first </think>; generation 1 keeps its last search block, else its last answer block (else
    dropped); later ones the last answer block, else the last search block, else the raw text."""
    if generation == 0:
        start, end = text.find(SEARCH_OPEN), text.rfind(SEARCH_CLOSE)
        if start < 0 or end < start:
            return None
        tail = tokenizer(text[:start], add_special_tokens=False)["input_ids"][-reasoning_tail:]
        return tokenizer.decode(tail) + text[start:end + len(SEARCH_CLOSE)]
    if THINK_CLOSE in text:
        text = text[text.index(THINK_CLOSE) + len(THINK_CLOSE):]
    search, answer = _last_block(text, SEARCH_OPEN, SEARCH_CLOSE), _last_block(text, ANSWER_OPEN, ANSWER_CLOSE)
    if generation == 1:
        return search or answer
    return answer or search or KEEP_RAW


def upstream_action_text(text):
    """The part of a kept turn upstream acted on: its last answer block when it holds one (the
    episode ends); with a <search> and no <answer> anywhere (a kept reasoning tail that names the
    tag included), the text up to its first </search>, which upstream closes when it is missing (the
    call it executed); else "" (upstream ended the episode without acting)."""
    if ANSWER_CLOSE in text:
        return _last_block(text, ANSWER_OPEN, ANSWER_CLOSE) or text
    if SEARCH_OPEN in text and ANSWER_OPEN not in text:
        return text.split(SEARCH_CLOSE)[0] + SEARCH_CLOSE
    return ""

