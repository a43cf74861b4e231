"""Maestro's core: the action protocol (parse a policy turn, run its call, format the reply) and the
rollout engine (batched multi-turn sampling with a hand-written KV-cache loop).

Part 1, the protocol.

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

Part 2, the rollout engine.

Token layout of one trajectory (Qwen chat template; the glue strings are read from the processor's
own chat template, so a template whose assistant header opens a think block, "<|im_start|>assistant
\\n<think>\\n", gets that opener after every observation too):

    prompt      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{images}{question}<|im_end|>\\n
                <|im_start|>assistant\\n
    turn 1      {sampled text} <search> Expert@@Skill: input </search>                     loss mask 1
    observation <|im_end|>\\n<|im_start|>user\\n<information>...</information><|im_end|>\\n
                <|im_start|>assistant\\n                                                   loss mask 0
    turn 2      ... </search>                                                             loss mask 1
    observation ...                                                                       loss mask 0
    last turn   ... <answer> ... </answer>                                                loss mask 1

A turn ends at the first "</search>" or "</answer>" in its decoded text (stop strings may span or
end inside tokens; the token that completes one is kept, it was sampled), when the policy samples an
end-of-turn token (<|im_end|>, kept with mask 1; the glue then starts after it, so there is never a
second <|im_end|>), or at a budget. Every sampled id is kept exactly as sampled and nothing is ever
re-tokenized: only the glue + observation string of each call is tokenized, and it is appended to the
running sequence and to the KV cache (only the new tokens are prefilled).

Turn loop: every row samples a turn; answers end the row ('answered'); any other turn, an invalid
one included, is one call (invalid actions get an error observation from the environment). After
`max_turns` calls the policy gets one last turn; if it does not answer the row ends with 'max_turns'
('invalid' when that last turn is not even a valid action). 'budget' when `max_response_tokens`
is reached mid-turn or an observation would not fit (it is never appended partially).

Batching: the unique prompts are prefilled once (vision tower included) and the cache is repeated
for the GRPO group. Rows run in lockstep inside a turn; a row whose turn ended waits with masked
pad tokens (holes, harmless because positions only count real tokens) and a row that is finished is
dropped from the cache at once. Qwen3-VL mRoPE positions are explicit: get_rope_index at prefill,
`cumsum(attention) - 1 + rope_delta` for every later token, so the cached path equals one full
forward over the final sequence. A text-only causal LM runs the same code with 1-D positions.
"""

import functools
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from experts import ExpertError, run_concurrently, strip_think
from policy import VISION_TOKENS, build_prompt, is_vision_processor, tokenizer_of
from registry import RegistryError
from skills import SkillContext, run_skill

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
PROTOCOL_TAGS = (THINK_OPEN, THINK_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, ANSWER_OPEN, ANSWER_CLOSE,
                 INFO_OPEN, INFO_CLOSE)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")
PROTOCOLS = ("ours", "upstream")  # the turn loop: ours (module docstring) or upstream's (upstream_edit)
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


def reply_of(observation: str) -> str:
    """The text inside an observation's <information>..</information>."""
    return observation.removeprefix(INFO_OPEN).removesuffix(INFO_CLOSE).strip()


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

    def __init__(self, registry, backends, services, tokenizer, obs_token_budget=1024, max_parallel=16,
                 protocol="ours"):
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
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol  # 'upstream': replies formatted as upstream did (format_upstream_observation)
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
        observation = (format_upstream_observation(result.text) if self.protocol == "upstream"
                       else format_observation(result.text, self.tokenizer, self.obs_token_budget))
        return StepResult(observation=observation, calls=list(result.calls), path=tuple(result.path),
                          **names), ""

# ==================================================================================================
# Part 2: the rollout engine
# ==================================================================================================

STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)


@dataclass
class RolloutConfig:
    group_size: int = 8             # samples per prompt (GRPO group)
    max_turns: int = 4              # expert calls per trajectory; one more turn to answer
    max_turn_tokens: int = 512      # sampled tokens per turn
    max_response_tokens: int = 4096  # sampled + observation tokens per trajectory
    temperature: float = 1.0        # divides the logits (also for the log-probs of greedy tokens)
    top_p: float = 1.0              # nucleus sampling; recorded log-probs are of the full distribution
    greedy: bool = False
    protocol: str = "ours"          # 'upstream': the turn loop the released checkpoint was trained with
                                    # (no stop strings, upstream_edit, bare observation turns)


@dataclass
class Turn:
    text: str                       # decoded sampled tokens of the turn, special tokens included
    action: Action
    result: StepResult | None       # None when the turn made no call (answer, or the trajectory ended)


@dataclass
class Trajectory:
    sample: object                  # data.Sample
    group: int                      # index of the sample in the rollout batch (GRPO group)
    prompt_ids: list
    response_ids: list              # sampled and observation tokens, exactly as conditioned on
    loss_mask: list                 # per response token: 1 sampled, 0 glue/observation
    sample_logprobs: list           # per response token: sampling-time log-prob, 0.0 where mask 0
    position_ids: torch.Tensor | None  # (3 or 1, P+R) positions used when sampling; None if teacher-forced
    turns: list = field(default_factory=list)
    num_turns: int = 0
    generations: int = 0            # turns generated; more than num_turns when upstream's loop dropped some
    stop_reason: str = ""           # 'answered' | 'max_turns' | 'budget' | 'invalid'
    image_index: int = 0            # which sample of the batch provides this row's images
    choice_positions: list = field(default_factory=list)  # (response index of a name's first token, 'expert'|'skill')


def unwrap(model):
    """The module that owns get_rope_index and the config, under DDP (`.module`) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_device(model):
    return next(unwrap(model).parameters()).device


# ----------------------------------------------------------------------------------------------
# Vocabulary facts the loop needs (computed once per rollout)

@dataclass
class _Vocab:
    tokenizer: object
    suppressed: torch.Tensor        # (S,) vision special ids, never sampled, -inf in log-probs too
    end_of_turn: set                # ids that end a turn (<|im_end|>, <|endoftext|>)
    may_close: torch.Tensor         # (V,) bool: token text contains the last char of a stop string
    glue_before: str                # closes the assistant turn, opens the user turn
    glue_after: str                 # closes the user turn, opens the next assistant turn
    im_end: int                     # id of <|im_end|>, which ends every turn upstream kept


def suppressed_ids(processor):
    tokenizer = tokenizer_of(processor)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS.values()]
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def observation_glue(processor):
    """(before, after): the chat-template text around a user turn that follows an assistant turn."""
    tokenizer = tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    reply, observation = "\u27e6reply\u27e7", "\u27e6observation\u27e7"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": observation}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)
    start, end = text.index(reply) + len(reply), text.index(observation)
    return text[start:end], text[end + len(observation):]


@functools.lru_cache(maxsize=8)  # one scan of the vocabulary per processor, not per rollout or demo
def _vocab(processor, vocab_size, device):
    tokenizer = tokenizer_of(processor)
    closers = {stop[-1] for stop in STOP_STRINGS}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    may_close = [any(c in (p or "") for c in closers) for p in pieces][:vocab_size]
    may_close += [False] * (vocab_size - len(may_close))
    end_of_turn = {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS} - {None, tokenizer.unk_token_id}
    before, after = observation_glue(processor)
    return _Vocab(tokenizer, torch.tensor(suppressed_ids(processor), dtype=torch.long, device=device),
                  end_of_turn, torch.tensor(may_close, dtype=torch.bool, device=device), before, after,
                  tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKENS[0]))


UPSTREAM_GLUE = ("<|im_start|>user", "<|im_end|>")  # upstream's bare observation turn: no newline, no assistant header


def observation_ids(vocab, observation, turn_ids, protocol="ours"):
    """Token ids of glue + observation + glue after a turn; no second end-of-turn token when the
    turn already ended with one. Upstream's glue is a bare user turn after the turn's <|im_end|>,
    and the policy goes on right after it (no assistant header)."""
    if protocol == "upstream":
        return vocab.tokenizer(UPSTREAM_GLUE[0] + observation + UPSTREAM_GLUE[1], add_special_tokens=False)["input_ids"]
    before = vocab.glue_before
    if turn_ids and turn_ids[-1] in vocab.end_of_turn:
        sampled_end = vocab.tokenizer.convert_ids_to_tokens(turn_ids[-1])
        if before.startswith(sampled_end):
            before = before[len(sampled_end):]
    return vocab.tokenizer(before + observation + vocab.glue_after, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Choice positions: where the policy picks an expert name and a skill name

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


def name_offsets(text, action):
    """Character offsets of the expert name and the skill name of a parsed search action in `text`."""
    opener = text.rfind(SEARCH_OPEN)
    model_at = text.find(action.model, opener + len(SEARCH_OPEN))
    skill_at = text.find(action.skill, text.find(CALL_SEPARATOR, model_at + len(action.model)))
    return model_at, skill_at


def choice_candidates(processor, registry, device="cpu"):
    """{"expert": LongTensor(C_e), "skill": LongTensor(C_s)} on `device`: the distinct first-token ids of the
    advertised names, tokenized in the call format of the system prompt. Names that share a first
    token share a candidate."""
    tokenizer = tokenizer_of(processor)
    skill = registry.advertised_skills()[0].name
    expert = registry.advertised_experts()[0].name
    firsts = {"expert": set(), "skill": set()}
    for kind, names in (("expert", [e.name for e in registry.advertised_experts()]),
                        ("skill", [s.name for s in registry.advertised_skills()])):
        for name in names:
            pair = (name, skill) if kind == "expert" else (expert, name)
            text = f"{SEARCH_OPEN} {pair[0]}{CALL_SEPARATOR}{pair[1]}: input {SEARCH_CLOSE}"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            offset = name_offsets(text, Action("search", model=pair[0], skill=pair[1]))[kind == "skill"]
            firsts[kind].add(ids[token_at(tokenizer, ids, offset)])
    return {kind: torch.tensor(sorted(ids), dtype=torch.long, device=device) for kind, ids in firsts.items()}


# ----------------------------------------------------------------------------------------------
# Per-row bookkeeping shared by the sampled rollout and teacher-forced trajectories

@dataclass
class _Row:
    traj: Trajectory
    prompt_positions: torch.Tensor | None = None  # (3 or 1, P)
    positions: list = field(default_factory=list)  # text position of each response token fed so far
    pending: list = field(default_factory=list)    # sequence tokens not yet in the KV cache
    turn_ids: list = field(default_factory=list)   # sampled tokens of the current turn
    turn_end: str = ""   # '' while sampling, else 'stop' | 'end_of_turn' | 'turn_budget' | 'budget'
    turn_start: int = 0           # len(response_ids) when the current turn began
    rewound: bool = False         # the turn's tokens left the trajectory: their cache columns must be masked
    discarded: bool = False       # the turn was dropped whole: sample the next one from the same context
    start_logits: torch.Tensor | None = None  # (V,) next-token logits when the current turn began

    def rewind(self):
        """Take the current turn's tokens out of the trajectory (upstream edits or drops turns)."""
        traj, keep = self.traj, self.turn_start
        del traj.response_ids[keep:], traj.loss_mask[keep:], traj.sample_logprobs[keep:], self.positions[keep:]
        self.pending, self.turn_ids, self.rewound = [], [], True

    def append(self, ids, sampled, logprobs=None):
        traj = self.traj
        traj.response_ids += ids
        traj.loss_mask += [int(sampled)] * len(ids)
        traj.sample_logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.pending += ids
        if sampled:
            self.turn_ids += ids


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


def apply_upstream_edit(row, vocab):
    """Replace the turn just sampled by what upstream kept of it (re-encoded, ending with <|im_end|>,
    loss mask 1, sampling log-prob 0: it was not sampled in this context), or drop it. Returns False
    when the turn was dropped."""
    tokenizer = vocab.tokenizer
    kept = upstream_edit(tokenizer.decode(row.turn_ids, skip_special_tokens=True), row.traj.generations - 1, tokenizer)
    if kept is None:
        row.rewind()
        return False
    if kept is not KEEP_RAW:
        ids = tokenizer(kept, add_special_tokens=False)["input_ids"] + [vocab.im_end]
        # unchanged: keep the sampled tokens and their log-probs; longer: upstream kept the raw generation
        if ids != row.turn_ids and len(ids) <= len(row.turn_ids):
            row.rewind()
            row.append(ids, sampled=True)
    return True


def upstream_action_text(text):
    """The part of a kept turn upstream acted on: its last answer block when it holds one (the
    episode ends), else the text up to its first </search> (the call it executed)."""
    if ANSWER_CLOSE in text:
        return _last_block(text, ANSWER_OPEN, ANSWER_CLOSE) or text
    if SEARCH_CLOSE in text:
        return text[:text.index(SEARCH_CLOSE) + len(SEARCH_CLOSE)]
    return text


def close_turn(row, vocab, cfg):
    """Parse the turn just sampled (under cfg.protocol 'upstream', what upstream_edit kept of it),
    record it and its choice positions, and end the trajectory if this turn answered, ran out of
    budget or was the last one allowed."""
    traj, tokenizer = row.traj, vocab.tokenizer
    traj.generations += 1
    if cfg.protocol == "upstream" and not apply_upstream_edit(row, vocab):
        row.discarded = True
        if traj.generations > cfg.max_turns:
            traj.stop_reason = "max_turns"
        return
    text = tokenizer.decode(row.turn_ids)
    acted = upstream_action_text(text) if cfg.protocol == "upstream" else text
    action = parse_action(acted)
    traj.turns.append(Turn(text, action, None))
    if action.kind == "search":  # (acted is a prefix of text when it is a call)
        start = len(traj.response_ids) - len(row.turn_ids)
        for kind, offset in zip(("expert", "skill"), name_offsets(acted, action)):
            traj.choice_positions.append((start + token_at(tokenizer, row.turn_ids, offset), kind))
    if action.kind == "answer":
        traj.stop_reason = "answered"
    elif row.turn_end == "budget" or (cfg.protocol == "upstream" and len(traj.response_ids) >= cfg.max_response_tokens):
        traj.stop_reason = "budget"  # upstream: the budget is checked on what its edit kept
    elif traj.generations > cfg.max_turns:
        traj.stop_reason = "invalid" if action.kind == "invalid" else "max_turns"
    elif cfg.protocol == "upstream" and action.kind != "search":
        traj.stop_reason = "invalid"  # upstream ended a trajectory whose kept turn made no call


def execute_turn(rows, env, vocab, cfg):
    """Run the calls of every row still going (concurrently, one env.step) and append the
    observations, unless one would not fit in the response budget. A dropped turn has no call."""
    waiting = [row for row in rows if not row.traj.stop_reason and not row.discarded]
    results = env.step([row.traj.turns[-1].action for row in waiting], [row.traj.sample for row in waiting]) if waiting else []
    for row, result in zip(waiting, results):
        row.traj.turns[-1].result = result
        ids = observation_ids(vocab, result.observation, row.turn_ids, cfg.protocol)
        if len(row.traj.response_ids) + len(ids) >= cfg.max_response_tokens:
            row.traj.stop_reason = "budget"
        else:
            row.append(ids, sampled=False)
    for row in rows:
        row.turn_ids, row.turn_end = [], ""


def finish(row):
    traj = row.traj
    traj.num_turns = len(traj.turns)
    if row.prompt_positions is not None:
        positions = list(row.positions)
        last = positions[-1] if positions else int(row.prompt_positions[0, -1])
        while len(positions) < len(traj.response_ids):  # the last sampled token is never fed
            last += 1
            positions.append(last)
        response = torch.tensor(positions, dtype=torch.long).expand(row.prompt_positions.shape[0], -1)
        traj.position_ids = torch.cat([row.prompt_positions, response], dim=1)
    return traj


# ----------------------------------------------------------------------------------------------
# The cached batch

def rope_positions(model, input_ids, attention_mask, image_grid_thw=None):
    """Positions of a full (padded) sequence: (3, B, L) mRoPE for Qwen3-VL, (B, L) for a text LM.
    Returns (positions, deltas (B, 1)) where deltas turn `cumsum(mask) - 1` into later positions."""
    core = unwrap(model)
    if hasattr(core.config, "vision_config"):
        image_tokens = (input_ids == core.config.image_token_id).int()
        return core.model.get_rope_index(input_ids, image_tokens, image_grid_thw=image_grid_thw,
                                         attention_mask=attention_mask)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return positions, torch.zeros_like(positions[:, :1])


@dataclass
class _Batch:
    """The rows in the KV cache, in lockstep. Column t of `attention` is cache slot t."""
    rows: list
    cache: DynamicCache
    attention: torch.Tensor   # (A, T) 1 on real tokens, 0 on pads and holes
    deltas: torch.Tensor      # (A, 1) mRoPE offset of text positions (0 for a text LM)
    logits: torch.Tensor      # (A, V) next-token logits of each row

    def keep(self, keep):
        """Drop rows from the cache and the state (keep: list of bools, one per row)."""
        if all(keep):
            return
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.attention.device)
        self.cache.batch_select_indices(index)
        self.attention, self.deltas, self.logits = self.attention[index], self.deltas[index], self.logits[index]
        self.rows = [row for row, k in zip(self.rows, keep) if k]


def prefill(model, encoded):
    """One forward over left-padded prompts.

    encoded: list of dicts with "input_ids" (1, P_i) and, for Qwen3-VL, "pixel_values" /
    "image_grid_thw" of that prompt. Returns (cache, attention (N, P), deltas (N, 1), logits (N, V),
    positions (3 or 1, N, P)).
    """
    device = model_device(model)
    lengths = [e["input_ids"].shape[1] for e in encoded]
    width = max(lengths)
    pad = unwrap(model).config.get_text_config().pad_token_id or 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        input_ids[i, width - lengths[i]:] = e["input_ids"][0]
        attention[i, width - lengths[i]:] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    images = [e for e in encoded if e.get("pixel_values") is not None]
    extra = {}
    if images:
        extra = {"pixel_values": torch.cat([e["pixel_values"] for e in images]).to(device),
                 "image_grid_thw": torch.cat([e["image_grid_thw"] for e in images]).to(device)}
    positions, deltas = rope_positions(model, input_ids, attention, extra.get("image_grid_thw"))
    cache = DynamicCache(config=unwrap(model).config.get_text_config())
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1, **extra)
    return cache, attention, deltas, out.logits[:, -1], positions if positions.dim() == 3 else positions[None]


def feed(model, batch, chunks):
    """Append one chunk of tokens per row (right-aligned, left pads masked) to the cache and keep
    the logits after each row's last token. Rows with an empty chunk only get masked pads."""
    rows, width = batch.rows, max(len(c) for c in chunks)
    device = batch.attention.device
    pad = unwrap(model).config.get_text_config().pad_token_id or 0
    new_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    new_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        if chunk:
            new_ids[i, width - len(chunk):] = torch.tensor(chunk)
            new_mask[i, width - len(chunk):] = 1
    batch.attention = torch.cat([batch.attention, new_mask.to(device)], dim=1)
    positions = (batch.attention.cumsum(-1) - 1).clamp(min=0)[:, -width:] + batch.deltas
    mrope = hasattr(unwrap(model).config, "vision_config")
    out = model(input_ids=new_ids.to(device), attention_mask=batch.attention,
                position_ids=positions.expand(3, -1, -1) if mrope else positions,
                cache=batch.cache, use_cache=True, logits_to_keep=1)
    batch.logits = out.logits[:, -1]
    for row, chunk, row_positions in zip(rows, chunks, positions.tolist()):
        row.positions += row_positions[width - len(chunk):]
        row.pending = []


def continue_after_observations(model, processor, env, batch):
    """Between turns: prefill only the new tokens (last sampled token + glue + observation)."""
    if any(row.pending for row in batch.rows):  # every row may have dropped its turn (upstream)
        feed(model, batch, [row.pending for row in batch.rows])


def sample_tokens(logits, suppressed, cfg):
    """(A, V) logits -> sampled tokens (A,) and their log-probs (A,) under the temperature-scaled
    distribution with the vision tokens removed (the distribution compute_logprobs recomputes)."""
    logits = logits.float().index_fill(1, suppressed, float("-inf"))
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1)
    if cfg.greedy:
        tokens = logprobs.argmax(-1)
    else:
        probs = logprobs.exp()
        if cfg.top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p  # mass before it already >= top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        tokens = torch.multinomial(probs, 1).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def generate_turn(model, batch, vocab, cfg):
    """Sample one turn for every row of the batch, in lockstep, until every row's turn has ended.
    Finished trajectories leave the cache immediately. Upstream's protocol has no stop strings and
    no mid-turn response budget (its edit decides what stays); a turn it edits or drops leaves the
    cache as masked columns (holes: positions count real tokens only), and what it kept is fed anew."""
    stops = STOP_STRINGS if cfg.protocol == "ours" else ()
    window = max(map(len, STOP_STRINGS)) + 1  # tokens: enough to hold any stop string
    turn_start = batch.attention.shape[1]  # cache column of the turn's first token
    for i, row in enumerate(batch.rows):
        row.turn_start, row.start_logits = len(row.traj.response_ids), batch.logits[i]
    while True:
        sampling = [i for i, row in enumerate(batch.rows) if not row.turn_end]
        index = torch.tensor(sampling, dtype=torch.long, device=batch.logits.device)
        tokens, logprobs = sample_tokens(batch.logits[index], vocab.suppressed, cfg)
        may_close = vocab.may_close[tokens]
        for i, token, logprob, check in zip(sampling, tokens.tolist(), logprobs.tolist(), may_close.tolist()):
            row = batch.rows[i]
            row.append([token], sampled=True, logprobs=[logprob])
            if token in vocab.end_of_turn:
                row.turn_end = "end_of_turn"
            elif check and stops and any(s in vocab.tokenizer.decode(row.turn_ids[-window:]) for s in stops):
                row.turn_end = "stop"
            elif stops and len(row.traj.response_ids) >= cfg.max_response_tokens:
                row.turn_end = "budget"
            elif len(row.turn_ids) >= cfg.max_turn_tokens:
                row.turn_end = "turn_budget"
            if row.turn_end:
                close_turn(row, vocab, cfg)
                if row.rewound:
                    batch.attention[i, turn_start:] = 0
                    row.rewound = False
        batch.keep([not row.traj.stop_reason for row in batch.rows])
        if all(row.turn_end for row in batch.rows):
            return
        feed(model, batch, [row.pending for row in batch.rows])


@torch.no_grad()
def rollout(model, processor, samples, env, cfg):
    """Sample cfg.group_size trajectories per sample. Returns len(samples) * group_size
    Trajectories, grouped: rows [i * group_size, (i + 1) * group_size) belong to samples[i].

    `model` is the module to call (it may be a DDP wrapper); helpers are reached on the unwrapped
    module. The caller handles autocast, eval mode and FSDP unsharding.
    """
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {cfg.temperature}); use greedy=True for greedy decoding")
    core = unwrap(model)
    vocab = _vocab(processor, core.config.get_text_config().vocab_size, model_device(model))
    prompts = [build_prompt(processor, env.registry, sample) for sample in samples]
    cache, attention, deltas, logits, positions = prefill(model, prompts)
    cache.batch_repeat_interleave(cfg.group_size)  # each unique prompt was prefilled once
    rows = []
    for i, (sample, prompt) in enumerate(zip(samples, prompts)):
        real = attention[i].bool()
        for _ in range(cfg.group_size):
            traj = Trajectory(sample=sample, group=i, prompt_ids=prompt["input_ids"][0].tolist(), response_ids=[],
                              loss_mask=[], sample_logprobs=[], position_ids=None, image_index=i)
            rows.append(_Row(traj, prompt_positions=positions[:, i, real].cpu()))
    repeat = lambda t: t.repeat_interleave(cfg.group_size, dim=0)  # noqa: E731
    batch = _Batch(list(rows), cache, repeat(attention), repeat(deltas), repeat(logits))
    if cfg.protocol not in PROTOCOLS or env.protocol != cfg.protocol:
        raise ValueError(f"rollout protocol {cfg.protocol!r} with an environment of protocol {env.protocol!r}: "
                         f"expected the same one of {PROTOCOLS}")
    while batch.rows:
        generate_turn(model, batch, vocab, cfg)
        execute_turn(batch.rows, env, vocab, cfg)
        batch.keep([not row.traj.stop_reason for row in batch.rows])
        if batch.rows:
            continue_after_observations(model, processor, env, batch)
        for i, row in enumerate(batch.rows):  # a dropped turn is sampled again from the same context
            if row.discarded:
                batch.logits[i], row.discarded = row.start_logits, False
    return [finish(row) for row in rows]


def response_text(traj, tokenizer):
    """The response as one string, sampled turns and observations in order, special tokens
    dropped: what upstream's reward manager scored (scoring.score_upstream)."""
    return tokenizer.decode(traj.response_ids, skip_special_tokens=True)


def trajectory_from_texts(processor, sample, env, turn_texts, max_turns=4):
    """A teacher-forced trajectory: the given assistant turn texts are tokenized (instead of
    sampled) and laid out exactly like a rollout under env.protocol (same glue and edits,
    observations from env.step, loss mask 1 on the turn tokens). Used for SFT demonstrations;
    log-probs are 0 and position_ids None."""
    vocab = _vocab(processor, len(tokenizer_of(processor)), "cpu")
    prompt = build_prompt(processor, env.registry, sample)
    row = _Row(Trajectory(sample=sample, group=0, prompt_ids=prompt["input_ids"][0].tolist(), response_ids=[],
                          loss_mask=[], sample_logprobs=[], position_ids=None))
    cfg = RolloutConfig(max_turns=max_turns, max_response_tokens=10 ** 9, protocol=env.protocol)
    for number, text in enumerate(turn_texts):
        if row.traj.stop_reason:
            raise ValueError(f"sample {sample.id!r}: demonstration turn {number + 1} of {len(turn_texts)} comes "
                             f"after the trajectory ended ({row.traj.stop_reason})")
        row.turn_start = len(row.traj.response_ids)
        ids = vocab.tokenizer(text, add_special_tokens=False)["input_ids"]
        row.append(ids + [vocab.im_end] if env.protocol == "upstream" else ids, sampled=True)  # upstream turns end at EOS
        row.turn_end = "stop"
        close_turn(row, vocab, cfg)
        if number < len(turn_texts) - 1:
            execute_turn([row], env, vocab, cfg)
        row.discarded = False
    if not row.traj.stop_reason:
        turns = row.traj.turns
        row.traj.stop_reason = "invalid" if not turns or turns[-1].action.kind == "invalid" else "max_turns"
    return finish(row)


# ----------------------------------------------------------------------------------------------
# Training-side: collate finished trajectories and recompute log-probs in one forward

@functools.lru_cache(maxsize=8)
def _blank_image_inputs(processor):
    """(token ids, pixel_values, image_grid_thw) of the smallest blank image the processor accepts:
    a loss-free row that makes the vision tower run in a micro-batch without images."""
    from PIL import Image
    side = processor.image_processor.patch_size * processor.image_processor.merge_size
    inputs = processor.image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")
    merged = int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size ** 2
    tokenizer = tokenizer_of(processor)
    ids = tokenizer.convert_tokens_to_ids([VISION_TOKENS["vision_start_token"]]
                                          + [VISION_TOKENS["image_token"]] * merged + [VISION_TOKENS["vision_end_token"]])
    return ids, inputs["pixel_values"], inputs["image_grid_thw"]


def collate(trajectories, processor, device="cpu", blank_image=False):
    """Right-padded full sequences (prompt + response) and the images of each row, on `device`.

    Returns, all on `device`:
      loss_mask, old_logprobs (B, L) (column t: value for token t);
      input_ids, attention_mask (B', L): the model's input, B' = B, or B + 1 with the blank row last;
      pixel_values / image_grid_thw: the rows' images in row order (absent when no row has one);
      targets (N,): the N loss-mask tokens in row-major order, and target_index (N,): their flat
        index into a (B, L-1) grid whose column t is token t+1 (what compute_logprobs fills);
      choice_index {"expert": (K_e, 2), "skill": (K_s, 2)}: (row, column whose NEXT token is the
        first token of a chosen name), and choice_rows {kind: (K,)}: that column's index among the N;
      suppressed_ids (S,) and num_tokens = N.
    Everything is built as Python lists and created on `device` in one call per tensor: no CPU
    tensor is left to meet the model's output, and no index depends on tensor data (no host sync).
    blank_image: when no row has an image, append one model-input row holding a blank image (no
    loss token, so it adds exactly nothing to the loss or the gradient) and the vision tower runs on
    every rank: DDP and FSDP2 collectives must match across ranks whatever each rank's data.
    """
    tokenizer = tokenizer_of(processor)
    vision = is_vision_processor(processor)
    rows = [t.prompt_ids + t.response_ids for t in trajectories]
    masks = [[0] * len(t.prompt_ids) + list(t.loss_mask) for t in trajectories]
    sampled = [[0.0] * len(t.prompt_ids) + list(t.sample_logprobs) for t in trajectories]
    pixels, grids = [], []
    if vision:
        per_sample = {}
        for traj in trajectories:
            if traj.sample.images:
                if id(traj.sample) not in per_sample:
                    per_sample[id(traj.sample)] = processor.image_processor(images=list(traj.sample.images),
                                                                            return_tensors="pt")
                pixels.append(per_sample[id(traj.sample)]["pixel_values"])
                grids.append(per_sample[id(traj.sample)]["image_grid_thw"])
        if blank_image and not pixels:
            ids, pixel_values, grid = _blank_image_inputs(processor)
            rows.append(ids)
            pixels, grids = [pixel_values], [grid]
    width = max(map(len, rows))
    pad = lambda values, fill: [v + [fill] * (width - len(v)) for v in values]  # noqa: E731
    targets, target_index, position_of = [], [], {}
    for r, (row, mask) in enumerate(zip(rows, masks)):
        for t in range(1, len(row)):
            if mask[t]:
                position_of[r, t - 1] = len(targets)
                targets.append(row[t])
                target_index.append(r * (width - 1) + t - 1)
    choices = {"expert": [], "skill": []}
    for r, traj in enumerate(trajectories):
        for position, kind in traj.choice_positions:
            choices[kind].append((r, len(traj.prompt_ids) + position - 1))
    long = dict(dtype=torch.long, device=device)
    batch = {"input_ids": torch.tensor(pad(rows, tokenizer.pad_token_id), **long),
             "attention_mask": torch.tensor(pad([[1] * len(row) for row in rows], 0), **long),
             "loss_mask": torch.tensor(pad(masks, 0), **long).reshape(len(masks), width),
             "old_logprobs": torch.tensor(pad(sampled, 0.0), dtype=torch.float32, device=device).reshape(len(masks), width),
             "targets": torch.tensor(targets, **long), "target_index": torch.tensor(target_index, **long),
             "num_tokens": len(targets),
             "suppressed_ids": torch.tensor(suppressed_ids(processor), **long),
             "choice_index": {k: torch.tensor(v, **long).reshape(-1, 2) for k, v in choices.items()},
             "choice_rows": {k: torch.tensor([position_of[rc] for rc in v], **long) for k, v in choices.items()}}
    if pixels:
        batch["pixel_values"] = torch.cat(pixels).to(device)
        batch["image_grid_thw"] = torch.cat(grids).to(device)
    return batch


def compute_logprobs(model, batch, temperature=1.0, candidates=None):
    """One full forward (with images) over a collated batch (collate(..., device=the model's)).

    Positions come from get_rope_index over the right-padded sequences (they equal the positions
    used when sampling). The lm_head only runs at the positions that predict a loss-mask token, so
    full-vocabulary logits are never materialized for the whole sequence.
    Returns logprobs_from_logits of those (N, V) logits.
    """
    predicts = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)  # t predicts loss-mask token t+1
    predicts[:batch["loss_mask"].shape[0], :-1] = batch["loss_mask"][:, 1:].bool()  # (a blank image row predicts nothing)
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    positions, _ = rope_positions(model, batch["input_ids"], batch["attention_mask"], images.get("image_grid_thw"))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                use_cache=False, logits_to_keep=predicts, **images)
    return logprobs_from_logits(out.logits, batch, temperature, candidates)


def logprobs_from_logits(logits, batch, temperature=1.0, candidates=None):
    """The training-side log-probs from the (N, V) logits of the N positions that predict a
    loss-mask token, in row-major order (what compute_logprobs' forward returns). Only index
    operations of known size: no tensor data decides a shape.

    Returns {"logprobs": (B, L-1) float32, column t = log-prob of token t+1 (0 where loss_mask[:, 1:] is 0),
             "choice_logprobs": {"expert": (K_e, C_e), "skill": (K_s, C_s)} when candidates is given
             (candidates: {kind: LongTensor(C)} on the logits' device, from choice_candidates)}.
    """
    batch_size, length = batch["loss_mask"].shape
    logits = logits.float().index_fill(1, batch["suppressed_ids"], float("-inf"))
    logprobs_all = torch.log_softmax(logits / temperature, dim=-1)  # (N, V)
    token_logprobs = logprobs_all.gather(1, batch["targets"][:, None]).squeeze(1)
    grid = torch.zeros(batch_size * (length - 1), dtype=token_logprobs.dtype, device=token_logprobs.device)
    result = {"logprobs": grid.index_copy(0, batch["target_index"], token_logprobs).view(batch_size, length - 1)}
    if candidates is not None:
        result["choice_logprobs"] = {kind: logprobs_all[batch["choice_rows"][kind]][:, ids]
                                     for kind, ids in candidates.items()}
    return result
