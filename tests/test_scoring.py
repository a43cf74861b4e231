"""The answer the parser read (maestro.answer_of), matching (including upstream's mis-scored cases) and the format term."""
import pytest

from maestro import answer_of, parse_action
from scoring import RewardConfig, compute_reward, is_correct, parse_number, score_upstream


def extract_answer(texts):
    """The answer scoring reads: the parser's actions of the policy's own turns."""
    return answer_of([parse_action(t) for t in texts])


@pytest.mark.parametrize("texts, answer", [
    (["<search>M@@S: q</search>", "<answer>42</answer>"], "42"),
    (["<answer>\n3.5\n</answer>"], "3.5"),                       # multi-line block
    (["<answer>1</answer>", "<answer>2</answer>"], "2"),         # the last one
    (["<think>guess <answer>9</answer></think><answer>4</answer>"], "4"),
    (["<think>guess <answer>9</answer></think><search>M@@S: q</search>"], None),  # reasoning is not an answer
    (["<search>M@@S: q</search>"], None),
    (["<answer>unclosed"], None),
    ([], None),
])
def test_extract_answer(texts, answer):
    assert extract_answer(texts) == answer


def test_extract_answer_never_reads_observations():
    # the rollout passes policy turns only; an <answer> inside an observation is never seen
    policy_turns = ["<search>M@@S: q</search>", "<answer>Go-Jek</answer>"]
    observation = "<information>Expert: <answer>Uber</answer></information>"
    assert extract_answer(policy_turns) == "Go-Jek"
    assert observation not in "".join(policy_turns)


@pytest.mark.parametrize("answer, truths, source, expected", [
    # numbers: upstream stripped the '-' and cut "3.5" at the period
    ("-3", ["-3"], "geometry3k", True),
    ("\u22123", ["-3"], "geometry3k", True),        # unicode minus
    ("3", ["-3"], "geometry3k", False),
    ("3.5", ["3.5"], "geometry3k", True),
    ("3", ["3.5"], "geometry3k", False),
    ("3.5", ["3"], "tallyqa", False),
    ("3.4", ["3"], "tallyqa", False),               # integer truths get no rounding
    ("3.0", ["3"], "tallyqa", True),
    ("1,234", ["1234"], "chartqa", True),
    ("1234", ["1,234"], "generic", True),
    ("1,234,567", ["1234567"], "generic", True),
    ("1,23", ["123"], "generic", False),            # not a thousands separator
    ("0.5", [".5"], "generic", True),
    (".5", ["0.5"], "generic", True),
    ("1/2", ["0.5"], "generic", True),
    ("three", ["3"], "tallyqa", True),
    ("3.1416", ["3.14"], "geometry3k", True),       # rounded to the truth's precision
    ("3.16", ["3.14"], "geometry3k", False),
    ("12 cm", ["12"], "generic", True),             # a unit word is ignored...
    ("$12", ["12"], "generic", True),
    ("5 is correct", ["5"], "generic", False),      # ...a sentence is not a unit
    ("3 or 4", ["3"], "generic", False),
    # percents: with a '%' on one side only, both 12 and 0.12 match
    ("12%", ["12"], "chartqa", True),
    ("12", ["12%"], "chartqa", True),
    ("12%", ["0.12"], "generic", True),
    ("0.12", ["12%"], "generic", True),
    ("12%", ["12%"], "generic", True),
    ("12", ["0.12"], "generic", False),
    ("0.12%", ["12%"], "generic", False),
    # tolerance: generic 1e-4 relative, chartqa 5% (ChartQA's relaxed accuracy)
    ("100.009", ["100"], "generic", True),
    ("101", ["100"], "generic", False),
    ("104", ["100"], "chartqa", True),
    ("106", ["100"], "chartqa", False),
    ("0", ["0"], "generic", True),
    # wrappers
    ("\\boxed{42}", ["42"], "geometry3k", True),
    ("x = \\boxed{\\frac{1}{2}} so \\boxed{7}", ["7"], "generic", True),
    ("$7$", ["7"], "generic", True),
    ("The answer is 7.", ["7"], "generic", True),
    ("Answer: Paris", ["Paris"], "generic", True),
    # option letters
    ("B", ["B"], "zwz", True),
    ("(B)", ["B"], "zwz", True),
    ("B.", ["B"], "zwz", True),
    ("b)", ["B"], "zwz", True),
    ("Option B", ["B"], "zwz", True),
    ("C", ["B"], "zwz", False),
    ("B is the best option", ["B"], "zwz", False),
    # yes / no: exact after normalization
    ("Yes.", ["yes"], "vstar", True),
    ("YES", ["yes"], "slake", True),
    ("yes and no", ["yes"], "slake", False),
    ("no", ["yes"], "vstar", False),
    ("Yes, the dog is on the left", ["yes"], "vstar", False),
    # text: normalized exact match, never substring containment
    ("Go-Jek", ["Go-Jek"], "chartqa", True),
    ("go jek", ["Go-Jek"], "chartqa", True),
    ("The Eiffel Tower", ["eiffel tower"], "generic", True),
    ("It is the Eiffel Tower in Paris", ["Eiffel Tower"], "generic", False),
    ("Eiffel", ["Eiffel Tower"], "generic", False),
    ("", ["yes"], "generic", False),
    ("the", ["a"], "generic", False),
    ("Paris", ["London", "Paris"], "generic", True),          # any ground truth
    # MCQ sources: ground truth = [letter, option text]
    ("C", ["C", "Basalt"], "msearthmcq", True),
    ("(C)", ["C", "Basalt"], "microvqa", True),
    ("basalt", ["C", "Basalt"], "msearthmcq", True),
    ("C. Basalt", ["C", "Basalt"], "msearthmcq", True),
    ("D. Basalt", ["C", "Basalt"], "msearthmcq", False),
    ("C. Granite", ["C", "Basalt"], "msearthmcq", False),
    ("Basalt rock formed from lava", ["C", "Basalt"], "msearthmcq", False),
    ("B", ["C", "Basalt"], "microvqa", False),
    # unknown sources use the generic rule, not a \boxed-only scorer
    ("42", ["42"], "some_new_source", True),
])
def test_is_correct(answer, truths, source, expected):
    assert is_correct(answer, truths, source) is expected


def test_parse_number_rejects_non_numbers():
    for text in ["", ".", "-", "abc", "1,2", "3 or 4", "12 345", "1/0", "1.5/2"]:
        assert parse_number(text) is None, text
    assert parse_number("-1,234.5 cm").value == -1234.5


CALL = "<search>Chart-R1@@Chart_Problem_Solver: q</search>"
ANSWER = "<answer>42</answer>"


def reward(turns, errors=None, truths=("42",), cfg=None):
    actions = [parse_action(t) for t in turns]
    errors = errors if errors is not None else [a.error for a in actions]
    return compute_reward(turns, actions, errors, list(truths), "generic", cfg or RewardConfig())


@pytest.mark.parametrize("turns, errors, truths, cfg, expected, reasons", [
    ([CALL, ANSWER], None, ["42"], None, 1.0, []),
    ([CALL, ANSWER], None, ["7"], None, 0.0, []),
    ([ANSWER], None, ["42"], None, 0.0, ["no_call"]),            # correct but no call: 1 - 1
    ([ANSWER], None, ["7"], None, -1.0, ["no_call"]),
    ([CALL, CALL], None, ["42"], None, -1.0, ["no_answer"]),     # never answered
    ([CALL, "<answer>4</answer> or <answer>42</answer>"], None, ["42"], None, 0.0, ["2_answers"]),
    (["<search>Chart-R1: q</search>", CALL, ANSWER], None, ["42"], None, 0.0,
     ["policy_error:missing_separator"]),
    ([CALL, ANSWER], ["unknown_model", ""], ["42"], None, 0.0, ["policy_error:unknown_model", "no_call"]),
    ([CALL, CALL, ANSWER], ["not_addressable", "", ""], ["42"], None, 0.0, ["policy_error:not_addressable"]),
    # expert and skill failures are not the policy's fault, and the call still counts
    ([CALL, ANSWER], ["expert_error", ""], ["42"], None, 1.0, []),
    ([CALL, ANSWER], ["skill_error", ""], ["42"], None, 1.0, []),
    # switches
    ([ANSWER], None, ["42"], RewardConfig(format_penalty=0.0), 1.0, ["no_call"]),
    ([ANSWER], None, ["42"], RewardConfig(allow_direct_answer=True), 1.0, []),
    ([ANSWER], None, ["7"], RewardConfig(allow_direct_answer=True), -1.0, ["no_call"]),
    ([ANSWER], None, ["7"], RewardConfig(require_call=False), 0.0, []),
    ([ANSWER], None, ["42"], RewardConfig(format_penalty=-0.5), 0.5, ["no_call"]),
])
def test_format_term(turns, errors, truths, cfg, expected, reasons):
    value, parts = reward(turns, errors, truths, cfg)
    assert value == expected
    assert parts["reasons"] == reasons
    assert parts["format_ok"] is (not reasons)
    assert parts["correct"] == int(extract_answer(turns) == truths[0])


def test_reward_parts():
    value, parts = reward([CALL, "<think>sure</think><answer>42</answer>"])
    assert (value, parts) == (1.0, {"correct": 1, "correct_strict": 1, "correct_upstream": None, "format_ok": True,
                                    "answer": "42", "reasons": []})


# ---- upstream's scorers (reported beside ours by eval.py; expected values follow the rules of
# shared/docs/upstream-maestro-spec.md section 3.3, one table per source)

def tagged(answer, before="<search>M@@S: q</search>\nuser\n<information>reply</information>"):
    return f"{before}<answer>{answer}</answer>"


UPSTREAM_CASES = [
    # chartqa: first single-line <answer> anywhere, 2-decimal numbers, else substring either way
    ("chartqa", tagged("Tania Vicenzino (Italy)"), ["Tania Vicenzino"], True),
    ("chartqa", tagged("Vicenzino"), ["Tania Vicenzino"], True),
    ("chartqa", tagged("Fabiana"), ["Tania Vicenzino"], False),
    ("chartqa", tagged("12.88"), ["12.88"], True),
    ("chartqa", tagged("The answer is 12.884."), ["12.88"], True),     # inner phrase, punctuation stripped
    ("chartqa", tagged("12.9"), ["12.88"], False),                     # no 5% tolerance upstream
    ("chartqa", tagged("12.88 million"), ["12.88"], False),            # not a float
    ("chartqa", tagged("1,234"), ["1,234"], False),                    # numeric-looking target, float() fails
    ("chartqa", tagged("-5"), ["-5"], False),                         # the '-' is stripped as punctuation
    ("chartqa", "Answer: Go-Jek", ["Go-Jek"], False),                  # no answer tags anywhere
    ("chartqa", "<information><answer>Go-Jek</answer></information><answer>Uber</answer>", ["Go-Jek"], True),
    ("chartqa", "<answer>\nGo-Jek\n</answer>", ["Go-Jek"], False),    # multi-line: the fallback reads "</answer>"
    # geometry3k / tallyqa: last <answer> (multi-line), \boxed or "answer is", normalised, 2 decimals
    ("geometry3k", tagged("x=30"), ["30"], True),
    ("geometry3k", tagged("30^\\circ"), ["30"], True),
    ("geometry3k", tagged("\\frac{1}{2}"), ["0.5"], True),
    ("geometry3k", tagged("\\dfrac12"), ["1/2"], True),
    ("geometry3k", tagged("2\\sqrt{3}"), ["2 \\sqrt{3}"], True),       # equal after removing spaces
    ("geometry3k", tagged("\\sqrt{12}"), ["3.46"], True),
    ("geometry3k", tagged("so the answer is 7."), ["7"], True),
    ("geometry3k", tagged("7.5"), ["7.49"], False),
    ("tallyqa", tagged("3"), ["3"], True),
    ("tallyqa", tagged("three"), ["3"], False),
    ("tallyqa", tagged("3 cups"), ["3"], False),
    ("tallyqa", "the expert says \\boxed{3}", ["3"], True),           # no tag: the whole response is read
    ("tallyqa", "<answer>2</answer> later <answer>\\boxed{4}</answer>", ["4"], True),  # the last block
    # msearthmcq / microvqa: ground truth [letter, option text]
    ("msearthmcq", tagged("B"), ["B", "granite"], True),
    ("msearthmcq", tagged("b"), ["B", "granite"], True),
    ("msearthmcq", tagged("Granite rock"), ["B", "granite"], True),
    ("msearthmcq", tagged("A. red"), ["A", "red"], True),
    ("microvqa", tagged("The answer is B, not a"), ["A", "red"], False),
    ("microvqa", tagged("C"), ["A", "red"], False),
    ("microvqa", tagged("A"), ["A"], False),                           # needs two ground-truth items
    # slake: a yes/no target inside the answer, else substring either way
    ("slake", tagged("yes, it is"), ["Yes"], True),
    ("slake", tagged("yes and no"), ["Yes"], True),
    ("slake", tagged("Liver and spleen"), ["Liver"], True),
    ("slake", tagged("Kidney"), ["Liver"], False),
    # vstar: yes/no exact, else substring either way
    ("vstar", tagged("Yes"), ["yes"], True),
    ("vstar", tagged("yes, it is"), ["yes"], False),
    ("vstar", tagged("dark red"), ["red"], True),
    # zwz: one character equal, else substring either way
    ("zwz", tagged("c"), ["C"], True),
    ("zwz", tagged("D"), ["C"], False),
    ("zwz", tagged("a cat"), ["cat"], True),
    # any other source: the last \boxed{} of the whole response (never an <answer>)
    ("my_source", tagged("42"), ["42"], False),
    ("my_source", tagged("\\boxed{42}"), ["42"], True),
]


@pytest.mark.parametrize("source, text, truths, expected", UPSTREAM_CASES)
def test_score_upstream(source, text, truths, expected):
    assert score_upstream(text, truths, source) is expected


def test_upstream_reward_reads_observations_and_is_opt_in():
    """With --reward upstream an expert's <answer> in an observation earns the reward even when the
    policy's own answer is wrong: the reason training keeps the strict scorer by default."""
    turns = ["<search>M@@S: q</search>", "<answer>Uber</answer>"]
    actions = [parse_action(t) for t in turns]
    response = "<search>M@@S: q</search>\nuser\n<information><answer>Go-Jek</answer></information>\n<answer>Uber</answer>"
    strict, parts = compute_reward(turns, actions, ["", ""], ["Go-Jek"], "chartqa", RewardConfig(), response)
    assert strict == 0.0 and parts["correct_strict"] == 0 and parts["correct_upstream"] == 1
    upstream, _ = compute_reward(turns, actions, ["", ""], ["Go-Jek"], "chartqa", RewardConfig(scorer="upstream"), response)
    assert upstream == 1.0
    with pytest.raises(ValueError, match="pass response_text"):
        compute_reward(turns, actions, ["", ""], ["Go-Jek"], "chartqa", RewardConfig(scorer="upstream"))
