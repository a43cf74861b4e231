"""Answer extraction, answer matching and the trajectory reward.

reward = correctness (1 or 0) + format term (0, or `format_penalty` when the trajectory is not
well-formed). Matching is strict by design: a long answer that merely *contains* the ground truth
is wrong, and a number must be a number (not a digit inside a sentence).

Matching rules, applied against each ground truth in turn (any match counts):
- the answer is cleaned first: the last \\boxed{...} is unwrapped, $...$ removed, a leading
  "The answer is" / "Answer:" dropped, one sentence-final period removed;
- a single-letter ground truth is an option letter: "B", "(B)", "B.", "B)", "Option B" match "B";
- a numeric ground truth is compared numerically when the answer is numeric too: signs, decimals
  (".5"), thousands separators ("1,234"), simple fractions ("1/2") and number words up to twenty
  are understood; one trailing unit word ("12 cm", "12%", "3 km/h") or a leading currency sign is
  ignored, so "5 is correct" or "3 or 4" are not numbers, and a numeric ground truth is never
  matched by a non-numeric answer. Percent: when exactly one side has a '%', both 12 and 0.12
  match "12%".
  Two numbers match within the data source's relative tolerance, or when the answer, rounded to the
  decimals the ground truth is written with (only if it has decimals), equals it ("3.1416" ~ "3.14");
- otherwise the texts must be equal after normalization (Unicode NFKC, casefold, punctuation
  removed, articles a/an/the dropped, whitespace collapsed). Yes/no questions need exactly "yes"
  or "no": "Yes." matches, "yes and no" does not.
Per data source (SOURCE_RULES): MCQ sources (msearthmcq, microvqa) store [letter, option text];
besides the letter or the exact option text, "B. <option text>" also counts. chartqa allows 5%
relative error (ChartQA's relaxed accuracy). Every other source uses the generic rule.
"""

import math
import re
import unicodedata
from dataclasses import dataclass

# Execution failures that are not the policy's fault: they do not make a trajectory malformed.
NOT_POLICY_FAULT = ("expert_error", "skill_error")


@dataclass(frozen=True)
class MatchRule:
    rel_tol: float = 1e-4
    abs_tol: float = 1e-6
    mcq: bool = False          # ground truths are [letter, option text]


SOURCE_RULES = {
    "chartqa": MatchRule(rel_tol=0.05),
    "msearthmcq": MatchRule(mcq=True),
    "microvqa": MatchRule(mcq=True),
}
GENERIC_RULE = MatchRule()


# ---- extraction ----

def after_reasoning(turn_text: str) -> str:
    """What a turn says outside its reasoning: the text after its last </think>."""
    return turn_text[turn_text.rfind("</think>") + len("</think>"):] if "</think>" in turn_text else turn_text


def extract_answer(policy_texts) -> str | None:
    """Content of the last complete <answer>..</answer> in the policy's own turns (never in
    observations), ignoring reasoning (text up to a turn's last </think>). None if absent."""
    for text in reversed(list(policy_texts)):
        visible = after_reasoning(text)
        end = visible.rfind("</answer>")
        start = visible.rfind("<answer>", 0, max(end, 0))
        if end >= 0 and start >= 0:
            return visible[start + len("<answer>"): end].strip()
    return None


# ---- cleaning and normalization ----

_ANSWER_PREFIX = re.compile(r"^(?:so\s*,?\s*)?(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*:?|:)\s*", re.I)
_ARTICLES = {"a", "an", "the"}


def _unwrap_boxed(text: str) -> str:
    start = text.rfind("\\boxed{")
    if start < 0:
        return text
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text


def clean_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", _unwrap_boxed(text.strip())).strip()
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    text = _ANSWER_PREFIX.sub("", text).strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text


def _normalize_char(c: str) -> str:
    category = unicodedata.category(c)
    if category == "Pd" or c in "/\\":   # dashes and slashes separate words
        return " "
    return "" if category.startswith("P") else c


def normalize_text(text: str) -> str:
    """Casefold, delete punctuation ("don't" -> "dont"; dashes and slashes become spaces), drop
    the articles a/an/the, collapse whitespace."""
    text = "".join(map(_normalize_char, unicodedata.normalize("NFKC", text).casefold()))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


# ---- numbers ----

_NUMBER = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d*)(?:\.(\d+))?(?:/(\d+))?")
_UNIT = re.compile(r"\s*(%|[^\s\d]{1,12})?")  # one word without digits: "cm", "km/h", "°C"
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty").split()


@dataclass(frozen=True)
class Number:
    value: float
    decimals: int     # digits after the decimal point as written
    percent: bool


def parse_number(text: str) -> Number | None:
    """'-1,234.5 cm' -> Number(-1234.5, 1, False); None unless the whole text is one number with
    an optional unit or currency sign."""
    text = text.strip().replace("\u2212", "-").lstrip("$€£¥").strip()
    if text.casefold() in _WORDS:
        return Number(float(_WORDS.index(text.casefold())), 0, False)
    match = _NUMBER.match(text)
    sign, whole, frac, denominator = match.groups()
    if not whole and frac is None:
        return None
    unit = _UNIT.fullmatch(text, match.end())
    if unit is None or (denominator is not None and frac is not None):
        return None
    value = float(whole.replace(",", "") or 0) + (float(f"0.{frac}") if frac else 0.0)
    if denominator is not None:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    percent = (unit.group(1) or "").strip() == "%"
    return Number(-value if sign == "-" else value, len(frac or ""), percent)


def _close(a: float, b: float, rule: MatchRule) -> bool:
    return math.isclose(a, b, rel_tol=rule.rel_tol, abs_tol=rule.abs_tol)


def numbers_match(answer: Number, truth: Number, rule: MatchRule) -> bool:
    candidates = [answer.value]
    if answer.percent != truth.percent:   # "12%" vs "0.12": the percent may be written as a fraction
        candidates.append(answer.value / 100 if answer.percent else answer.value * 100)
    for value in candidates:
        if _close(value, truth.value, rule):
            return True
        if truth.decimals and round(value, truth.decimals) == round(truth.value, truth.decimals):
            return True
    return False


# ---- matching ----

_LETTER = re.compile(r"\(?\s*(?:option|choice)?\s*\(?([A-Za-z])\s*\)?\s*[.:)]?", re.I)


def option_letter(answer: str) -> str | None:
    match = _LETTER.fullmatch(answer.strip())
    return match.group(1).upper() if match else None


def _matches(answer: str, truth: str, rule: MatchRule) -> bool:
    truth = clean_answer(truth)
    if len(truth) == 1 and truth.isascii() and truth.isalpha():
        return option_letter(answer) == truth.upper()
    truth_number = parse_number(truth)
    if truth_number is not None:   # a numeric truth needs a numeric answer ("1,23" is not 123)
        answer_number = parse_number(answer)
        return answer_number is not None and numbers_match(answer_number, truth_number, rule)
    normalized = normalize_text(answer)
    return bool(normalized) and normalized == normalize_text(truth)


def is_correct(answer: str, ground_truths, data_source: str) -> bool:
    """Whether `answer` (the content of the <answer> block) matches any ground truth."""
    if answer is None:
        return False
    rule = SOURCE_RULES.get(data_source, GENERIC_RULE)
    truths = [ground_truths] if isinstance(ground_truths, str) else [str(t) for t in ground_truths]
    answer = clean_answer(answer)
    if not answer:
        return False
    if rule.mcq and len(truths) >= 2:   # "B. <option text>" names the letter and the option
        match = re.fullmatch(r"\(?([A-Za-z])[.:)]\s*(.+)", answer, re.S)
        if match and match.group(1).upper() == clean_answer(truths[0]).upper():
            if any(_matches(match.group(2), t, rule) for t in truths[1:]):
                return True
    return any(_matches(answer, truth, rule) for truth in truths)


# ---- reward ----

@dataclass
class RewardConfig:
    format_penalty: float = -1.0       # added when the trajectory is malformed; 0 disables the term
    require_call: bool = True          # a trajectory without any valid skill call is malformed
    allow_direct_answer: bool = False  # ...unless its answer is correct


def compute_reward(turn_texts, actions, errors, ground_truths, data_source, cfg=None):
    """Reward of one trajectory and its parts.

    turn_texts: the policy-generated text of each turn (no observations); actions: the parsed
    Action of each turn; errors: the error kind of each turn's step ('' when none). Well-formed
    (upstream's definition, without its loopholes) means exactly one answer block, at least one
    valid call, and no mistake by the policy: no invalid action, unknown name or non-addressable
    skill. An expert or skill failure is not the policy's fault and is not penalized, and the call
    that met it still counts as a valid call.
    Returns (reward, {"correct": 0|1, "format_ok": bool, "answer": str|None, "reasons": [str]}).
    """
    cfg = cfg or RewardConfig()
    answer = extract_answer(turn_texts)
    correct = int(answer is not None and is_correct(answer, ground_truths, data_source))

    reasons = []
    n_answers = sum(after_reasoning(t).count("<answer>") for t in turn_texts)
    if n_answers != 1:
        reasons.append("no_answer" if n_answers == 0 else f"{n_answers}_answers")
    errors = list(errors) + [""] * (len(actions) - len(errors))
    calls = 0
    for action, error in zip(actions, errors):
        error = error or action.error
        if action.kind == "invalid" or (error and error not in NOT_POLICY_FAULT):
            reasons.append(f"policy_error:{error}")
        elif action.kind == "search":
            calls += 1
    if cfg.require_call and not calls and not (cfg.allow_direct_answer and correct):
        reasons.append("no_call")
    format_ok = not reasons
    reward = correct + (0.0 if format_ok else cfg.format_penalty)
    return float(reward), {"correct": correct, "format_ok": format_ok, "answer": answer, "reasons": reasons}
