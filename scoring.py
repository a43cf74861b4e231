"""Answer matching and the trajectory reward (the answer is the parser's: maestro.answer_of).

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

import ast
import math
import re
import string
import unicodedata
from dataclasses import dataclass

from maestro import ANSWER_CLOSE, ANSWER_OPEN, answer_blocks, answer_of

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
    """Whether `answer` (the content of the answer block) matches any ground truth."""
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


# ---- upstream's scorers, reimplemented to report the paper's protocol beside ours ----
#
# Upstream's reward manager scored the decoded response -- policy turns *and* observations, in
# order -- with one checker per data source. The rules below follow its behaviour as read from its
# code (shared/docs/upstream-maestro-spec.md section 3.3), loopholes included: they exist to
# reproduce the paper's numbers, and training with them (--reward upstream) can be gamed.

def _strip_punctuation(text: str) -> str:
    return text.strip(string.punctuation + string.whitespace)


_ANSWER_BLOCK = re.escape(ANSWER_OPEN) + "(.*?)" + re.escape(ANSWER_CLOSE)
_UPSTREAM_FALLBACKS = (r"answer:\s*(.*)", r"\\boxed\{([^}]*)\}", r"\$\$(.*?)\$\$", r"\$(.*?)\$")
_NOT_AN_ANSWER_LINE = ("Question:", "Problem:", "Solve:", "Given:")


def upstream_extract(text: str) -> str:
    r"""The answer upstream's non-math checkers read: the first single-line answer block
    anywhere (an inner "The answer is" / "Answer:" / \boxed{} / $..$ narrows it), else the first
    "Answer:" / \boxed{} / $..$ in the text, else its last line that does not look like a question."""
    tagged = re.search(_ANSWER_BLOCK, text, re.I)
    if tagged:
        inside = _strip_punctuation(tagged.group(1))
        for pattern in (r"The answer is\s+(.*)",) + _UPSTREAM_FALLBACKS:
            found = re.search(pattern, inside, re.I)
            if found:
                return _strip_punctuation(found.group(1))
        return inside
    for pattern in _UPSTREAM_FALLBACKS:
        found = re.search(pattern, text, re.I)
        if found:
            return _strip_punctuation(found.group(1))
    for line in reversed(text.strip().split("\n")):
        line = line.strip()
        if line and not line.startswith(_NOT_AN_ANSWER_LINE):
            line = _strip_punctuation(re.sub(r"^(So|Therefore|Thus|Hence|Finally|The answer is)\s*[:\-]?\s*", "",
                                             line, flags=re.I))
            if line:
                return line
    return ""


def _either_contains(a: str, b: str) -> bool:
    return a in b or b in a


def _upstream_chartqa(answer: str, truths) -> bool:
    target = truths[0]
    if re.fullmatch(r"[\d.,\-/]+", re.sub(r"[ ,.]", "", target) or "x"):  # "numeric-looking"
        try:
            return round(float(answer.strip()), 2) == round(float(target.strip()), 2)
        except ValueError:
            return False
    return _either_contains(answer.lower(), target.lower())


def _upstream_mcq(answer: str, truths) -> bool:
    if len(truths) < 2:
        return False
    if len(answer) == 1:
        return answer.lower() == truths[0].lower()
    return _either_contains(answer.lower(), truths[1].lower())


def _upstream_slake(answer: str, truths) -> bool:
    target = str(truths[0]).strip().lower()
    return target in answer.lower() if target in ("yes", "no") else _either_contains(answer.lower(), target)


def _upstream_vstar(answer: str, truths) -> bool:
    answer, target = answer.lower(), truths[0].lower()
    return target.strip() == answer.strip() if target in ("yes", "no") else _either_contains(answer, target)


def _upstream_zwz(answer: str, truths) -> bool:
    target = truths[0].lower()
    return answer.lower() == target if len(answer) == 1 else _either_contains(answer.lower(), target)


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (balanced braces) or "\boxed x" in text, else None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\boxed "))
    if start < 0:
        return None
    if text.startswith("\\boxed ", start):
        return text[start + len("\\boxed "):].split("$")[0].strip()
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _braced(text: str, i: int) -> tuple:
    """(argument, next index) of a LaTeX argument at text[i]: {...} or a single character."""
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j], j + 1
    return text[i:i + 1], i + 1


def _normalize_latex(text: str) -> str:
    r"""Hendrycks-style MATH answer normalisation (as upstream's math checker applied it): drops
    spacing, \left/\right, degrees, dollars, units after \text{, percent signs; "x = 5" -> "5";
    \sqrt3 -> \sqrt{3}; \frac12 -> \frac{1}{2}; "0.5" -> \frac{1}{2}; "3/4" -> \frac{3}{4}."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in text:
        text = text.split("\\text{ ")[0]
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = re.sub(r"\\sqrt(?!\{)(.)", r"\\sqrt{\1}", text).replace(" ", "")
    out, i = "", 0
    while i < len(text):
        if text.startswith("\\frac", i):
            numerator, i = _braced(text, i + len("\\frac"))
            denominator, i = _braced(text, i)
            out += f"\\frac{{{numerator}}}{{{denominator}}}"
        else:
            out += text[i]
            i += 1
    if out == "0.5":
        out = "\\frac{1}{2}"
    fraction = re.fullmatch(r"(-?\d+)/(\d+)", out)
    return f"\\frac{{{fraction.group(1)}}}{{{fraction.group(2)}}}" if fraction else out


def _arithmetic(node):
    """Value of a parsed arithmetic expression: numbers, + - * / **, sqrt() and pi; else ValueError."""
    if isinstance(node, ast.Expression):
        return _arithmetic(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arithmetic(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
        a, b = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
            raise ValueError("power too large")
        return {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                ast.Div: lambda: a / b, ast.Pow: lambda: a ** b}[type(node.op)]()
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
            and len(node.args) == 1 and not node.keywords):
        return math.sqrt(_arithmetic(node.args[0]))
    raise ValueError("not arithmetic")


def _latex_value(text: str) -> float | None:
    """The number a normalised LaTeX answer denotes (fractions, square roots, powers), else None."""
    expression = re.sub(r"\\frac\{([^}]*)\}\{([^}]*)\}", r"(\1)/(\2)", text)
    expression = re.sub(r"\\sqrt\{([^}]*)\}", r"sqrt(\1)", expression).replace("\\pi", "pi").replace("^", "**")
    try:
        value = _arithmetic(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def upstream_math_equal(answer: str, truth: str) -> bool:
    """Upstream's math equivalence: equal after normalisation, or the same number to 2 decimals."""
    a, b = _normalize_latex(answer), _normalize_latex(truth)
    if a == b:
        return True
    x, y = _latex_value(a), _latex_value(b)
    return x is not None and y is not None and round(x, 2) == round(y, 2)


_MATH_PHRASES = (r"the\s+answer\s+is\s*:?\s*(.+?)(?:\.|$)", r"answer\s*:?\s*(.+?)(?:\.|$)",
                 r"the\s+final\s+answer\s+is\s*:?\s*(.+?)(?:\.|$)", r"final\s+answer\s*:?\s*(.+?)(?:\.|$)",
                 r"solution\s*:?\s*(.+?)(?:\.|$)", r"the\s+solution\s+is\s*:?\s*(.+?)(?:\.|$)")


def _upstream_math(response_text: str, truths) -> bool:
    r"""geometry3k / tallyqa: the last answer block if any (else the whole response: upstream's
    tag requirement was dead code), then its last \boxed{}, else an "answer is" phrase, else all of it."""
    blocks = re.findall(_ANSWER_BLOCK, response_text, re.I | re.S)
    text = blocks[-1].strip() if blocks else response_text
    answer = last_boxed(text)
    if answer is None:
        for pattern in _MATH_PHRASES:
            found = re.search(pattern, text.lower(), re.I | re.S)
            if found and found.group(1).strip().strip("\"'").rstrip("."):
                answer = found.group(1).strip().strip("\"'").rstrip(".")
                break
        else:
            answer = text.strip()
    return bool(answer) and upstream_math_equal(answer, str(truths[0]))


_UPSTREAM_CHECKERS = {"chartqa": _upstream_chartqa, "msearthmcq": _upstream_mcq, "microvqa": _upstream_mcq,
                      "slake": _upstream_slake, "vstar": _upstream_vstar, "zwz": _upstream_zwz}


def score_upstream(response_text: str, ground_truths, data_source: str) -> bool:
    r"""Whether upstream's reward manager counted this response correct.

    response_text: the decoded response as upstream scored it, policy turns and observations in
    order (so an expert's answer block or \boxed{} inside an observation can count). Non-math
    sources need an answer block's opening and closing tags somewhere, read upstream_extract's answer and compare by
    source (chartqa: 2-decimal numbers when the target looks numeric, else case-insensitive
    substring either way; msearthmcq / microvqa: a one-character answer equals the letter, else
    substring either way with the option text; slake: a yes/no target inside the answer, else
    substring either way; vstar: yes/no exact, else substring either way; zwz: one character
    equal, else substring either way). geometry3k / tallyqa: _upstream_math. Any other source:
    the last \boxed{} of the whole response, by upstream_math_equal."""
    truths = [ground_truths] if isinstance(ground_truths, str) else [str(t) for t in ground_truths]
    if not truths:
        return False
    if data_source in ("geometry3k", "tallyqa"):
        return _upstream_math(response_text, truths)
    if data_source not in _UPSTREAM_CHECKERS:
        boxed = last_boxed(response_text)
        return boxed is not None and upstream_math_equal(boxed, truths[0])
    if ANSWER_OPEN not in response_text or ANSWER_CLOSE not in response_text:
        return False
    answer = upstream_extract(response_text)
    return bool(answer) and _UPSTREAM_CHECKERS[data_source](answer, truths)


# ---- reward ----

@dataclass
class RewardConfig:
    format_penalty: float = -1.0       # added when the trajectory is malformed; 0 disables the term
    require_call: bool = True          # a trajectory without any valid skill call is malformed
    allow_direct_answer: bool = False  # ...unless its answer is correct
    scorer: str = "strict"             # strict: is_correct on the policy's last answer; upstream: score_upstream
                                       # on the whole decoded response (observations too: gameable, see README)


def compute_reward(turn_texts, actions, errors, ground_truths, data_source, cfg=None, response_text=None):
    """Reward of one trajectory and its parts.

    turn_texts: the policy-generated text of each turn (no observations); actions: the parsed
    Action of each turn; errors: the error kind of each turn's step ('' when none). Well-formed
    (upstream's definition, without its loopholes) means exactly one answer block, at least one
    valid call, and no mistake by the policy: no invalid action, unknown name or non-addressable
    skill. An expert or skill failure is not the policy's fault and is not penalized, and the call
    that met it still counts as a valid call.
    response_text: the decoded response, observations included (eval.response_text); when given,
    upstream's verdict is computed too, and cfg.scorer "upstream" needs it.
    Returns (reward, {"correct": 0|1 (by cfg.scorer), "correct_strict": 0|1, "correct_upstream": 0|1|None,
    "format_ok": bool, "answer": str|None, "reasons": [str]}).
    """
    cfg = cfg or RewardConfig()
    if cfg.scorer not in ("strict", "upstream"):
        raise ValueError(f"reward scorer: expected strict or upstream, got {cfg.scorer!r}")
    if cfg.scorer == "upstream" and response_text is None:
        raise ValueError("the upstream scorer reads the whole decoded response: pass response_text")
    answer = answer_of(actions)
    strict = int(answer is not None and is_correct(answer, ground_truths, data_source))
    upstream = None if response_text is None else int(score_upstream(response_text, ground_truths, data_source))
    correct = upstream if cfg.scorer == "upstream" else strict

    reasons = []
    n_answers = sum(map(answer_blocks, turn_texts))
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
    return float(reward), {"correct": correct, "correct_strict": strict, "correct_upstream": upstream,
                           "format_ok": format_ok, "answer": answer, "reasons": reasons}
