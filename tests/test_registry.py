import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from registry import Registry, RegistryError, normalize_name
from maestro import system_prompt, user_prompt

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper.json"


def base_config() -> dict:
    """A small registry shaped like the paper's: advertised solvers, a hidden router with one
    addressable and one router-only child, a hidden expert, a decoy 'Action' skill."""
    return {
        "experts": [
            {"name": "Chart-R1", "description": "reads charts",
             "base_url": "http://127.0.0.1:2364/v1", "generation": {"temperature": 0.2}},
            {"name": "GLM-4.6V-Flash", "aliases": ["glm"], "description": "geometry and perception",
             "base_url": "http://127.0.0.1:2376/v1"},
            {"name": "qwen3-vl-8b-instruct", "model": "qwen3-VL-8B-Instruct",
             "description": "counting", "base_url": "http://127.0.0.1:2362/v1"},
            {"name": "Hidden-Expert", "description": "held out of the prompt",
             "base_url": "http://127.0.0.1:2381/v1", "advertised": False},
        ],
        "skills": [
            {"name": "Chart_Problem_Solver", "level": 1, "description": "bar, line and pie charts",
             "implementation": "chart:solve", "example": "Which bar is tallest?"},
            {"name": "Geometric_Problem_Solver", "level": 1, "description": "geometry figures",
             "implementation": "geometric:solve", "example": "What is angle ABC?"},
            {"name": "ERQA_Action_Adjustment_Solver", "level": 1, "description": "robot actions",
             "implementation": "erqa:solve", "advertised": False},
            {"name": "OCRBench_Master_Router_Skill", "aliases": ["ocr_problem_solver"], "level": 1,
             "description": "text in images", "implementation": "router:route",
             "children": ["OCRBench_Key_Information_Extraction_Skill", "OCRBench_Scene_Text_QA_Skill"],
             "route_keywords": {"OCRBench_Key_Information_Extraction_Skill": ["receipt", "total"]},
             "default_child": "OCRBench_Scene_Text_QA_Skill", "advertised": False},
            {"name": "OCRBench_Key_Information_Extraction_Skill", "level": 2,
             "description": "fields of receipts", "implementation": "ocrbench:solve",
             "addressable": True, "advertised": False},
            {"name": "OCRBench_Scene_Text_QA_Skill", "level": 2, "description": "text on signs",
             "implementation": "ocrbench:solve"},
        ],
        "services": [{"name": "ocr", "base_url": "http://127.0.0.1:2388/v1", "model": "GLM-OCR"}],
        "oracle": {"chartqa": ["Chart-R1", "Chart_Problem_Solver"]},
    }


def build(config: dict) -> Registry:
    return Registry.from_dict(config, check_implementations=False)


def load_error(tmp_path, config) -> RegistryError:
    """Write config to a file, load it, return the (config) error it raises."""
    path = tmp_path / "registry.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))
    with pytest.raises(RegistryError) as caught:
        Registry.load(path, check_implementations=False)
    assert caught.value.kind == "config"
    assert str(path) in str(caught.value), "the message must name the file"
    return caught.value


def test_normalize_name_folds_case_and_separators():
    assert normalize_name("  Chart-R1 ") == "chart_r1"
    assert normalize_name("chart_problem  solver") == "chart_problem_solver"
    assert normalize_name("Chart - Problem__Solver") == "chart_problem_solver"
    assert normalize_name("GLM-4.6V-Flash") == "glm_4.6v_flash"


@pytest.mark.parametrize("model", ["Chart-R1", "chart-r1", "CHART_R1", "chart r1", " Chart-R1 "])
@pytest.mark.parametrize("skill", ["Chart_Problem_Solver", "chart-problem-solver",
                                   "CHART PROBLEM SOLVER", "chart_problem-solver"])
def test_resolve_spelling_variants(model, skill):
    expert, resolved = build(base_config()).resolve(model, skill)
    assert (expert.name, resolved.name) == ("Chart-R1", "Chart_Problem_Solver")


def test_resolve_aliases_and_served_name():
    registry = build(base_config())
    assert registry.resolve_expert("GLM").name == "GLM-4.6V-Flash"
    assert registry.resolve_skill("OCR-Problem-Solver").name == "OCRBench_Master_Router_Skill"
    # the served name differs only in case, so it resolves to the same expert
    expert = registry.resolve_expert("qwen3-VL-8B-Instruct")
    assert (expert.name, expert.model) == ("qwen3-vl-8b-instruct", "qwen3-VL-8B-Instruct")
    assert registry.experts["Chart-R1"].model == "Chart-R1"  # model defaults to the name


def test_no_substring_guessing():
    registry = build(base_config())
    # upstream sent this to the ERQA action solver because "extrACTION" contains "action"
    with pytest.raises(RegistryError) as caught:
        registry.resolve_skill("Key_Information_Extraction")
    assert caught.value.kind == "unknown_skill"
    assert registry.resolve_skill("OCRBench_Key_Information_Extraction_Skill").name == \
        "OCRBench_Key_Information_Extraction_Skill"
    for guess in ("qwen3-vl-235b", "qwen3-vl", "Chart"):
        with pytest.raises(RegistryError) as caught:
            registry.resolve_expert(guess)
        assert caught.value.kind == "unknown_model"


def test_unknown_names_list_valid_names_advertised_first():
    registry = build(base_config())
    with pytest.raises(RegistryError) as caught:
        registry.resolve("GPT-5", "Chart_Problem_Solver")
    message = str(caught.value)
    assert caught.value.kind == "unknown_model" and "'GPT-5'" in message
    assert message.index("Chart-R1") < message.index("Hidden-Expert")
    with pytest.raises(RegistryError) as caught:
        registry.resolve("Chart-R1", "Table_Solver")
    message = str(caught.value)
    assert caught.value.kind == "unknown_skill"
    assert message.index("Geometric_Problem_Solver") < message.index("ERQA_Action_Adjustment_Solver")
    assert "OCRBench_Key_Information_Extraction_Skill" in message  # addressable level 2
    assert "OCRBench_Scene_Text_QA_Skill" not in message           # router-only level 2


def test_level2_skill_reached_only_through_its_router():
    registry = build(base_config())
    assert not registry.skills["OCRBench_Scene_Text_QA_Skill"].addressable  # level-2 default
    with pytest.raises(RegistryError) as caught:
        registry.resolve("Chart-R1", "ocrbench scene text qa skill")
    assert caught.value.kind == "not_addressable"
    assert "OCRBench_Master_Router_Skill" in str(caught.value)


def test_non_advertised_entries_resolve():
    expert, skill = build(base_config()).resolve("hidden-expert", "erqa_action_adjustment_solver")
    assert (expert.name, skill.name) == ("Hidden-Expert", "ERQA_Action_Adjustment_Solver")


def test_system_prompt_shows_exactly_the_advertised_entries():
    prompt = system_prompt(build(base_config()))
    for name in ("Chart-R1", "GLM-4.6V-Flash", "qwen3-vl-8b-instruct",
                 "Chart_Problem_Solver", "Geometric_Problem_Solver"):
        assert name in prompt
    for name in ("Hidden-Expert", "ERQA_Action", "OCRBench"):
        assert name not in prompt
    assert "<search> Model-Name@@Skill-Name: input </search>" in prompt
    assert "Model-Name must be one of: Chart-R1, GLM-4.6V-Flash, qwen3-vl-8b-instruct\n" in prompt
    assert "<search> Chart-R1@@Chart_Problem_Solver: Which bar is tallest? </search>" in prompt
    assert "<information>" in prompt and "<answer>" in prompt and "at most 4 calls" in prompt


def test_router_prompt_mentions_its_sub_skills():
    config = base_config()
    config["skills"][3]["advertised"] = True
    prompt = system_prompt(build(config))
    assert "OCRBench_Master_Router_Skill: text in images" in prompt
    assert "OCRBench_Scene_Text_QA_Skill: text on signs" in prompt
    assert "OCRBench_Key_Information_Extraction_Skill (also callable directly)" in prompt


def test_adding_one_entry_shows_up_and_resolves():
    config = base_config()
    config["experts"].append({"name": "Step3-VL-10B", "description": "a new generalist",
                              "base_url": "http://127.0.0.1:2382/v1"})
    config["skills"].append({"name": "Map_Reading_Skill", "level": 1, "description": "maps",
                             "implementation": "science:solve", "example": "Which river is longer?"})
    registry = build(config)
    prompt = system_prompt(registry)
    assert "Step3-VL-10B: a new generalist" in prompt and "Map_Reading_Skill: maps" in prompt
    assert "Which river is longer?" in prompt
    expert, skill = registry.resolve("step3-vl-10b", "map reading skill")
    assert (expert.name, skill.name) == ("Step3-VL-10B", "Map_Reading_Skill")


def test_prompt_options():
    config = base_config()
    config["prompt"] = {"max_calls": 2, "examples": False, "guidelines": False,
                        "preamble": "Route questions.", "user_suffix": ""}
    registry = build(config)
    prompt = system_prompt(registry)
    assert prompt.startswith("Route questions.")
    assert "Which bar is tallest?" not in prompt and "bar, line and pie charts" not in prompt
    assert "Chart_Problem_Solver" in prompt and "at most 2 calls" in prompt
    assert len(prompt) < len(system_prompt(build(base_config())))
    assert user_prompt(registry, "How many dogs?") == "How many dogs?"
    default_user = user_prompt(build(base_config()), "How many dogs?")
    assert default_user.startswith("How many dogs?\n\n") and len(default_user) > 30
    config["prompt"]["brief"] = True
    brief = system_prompt(build(config))
    assert len(brief) < len(prompt) and "Chart_Problem_Solver" in brief and "Chart-R1" in brief
    assert "<search> Model-Name@@Skill-Name: input </search>" in brief and "at most 2 calls" in brief
    assert "<answer> ... </answer>" in brief


def test_oracle_and_services():
    registry = build(base_config())
    assert registry.oracle == {"chartqa": ("Chart-R1", "Chart_Problem_Solver")}
    assert registry.services["ocr"].model == "GLM-OCR"
    assert registry.services["ocr"].timeout == 120.0


def test_local_path_is_relative_to_the_config_file(tmp_path):
    config = base_config()
    config["experts"].append({"name": "Tiny", "description": "in-process", "local_path": "models/tiny"})
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(config))
    registry = Registry.load(path, check_implementations=False)
    assert registry.experts["Tiny"].local_path == str(tmp_path.resolve() / "models" / "tiny")
    assert registry.experts["Tiny"].base_url is None


def _mutate(change):
    config = base_config()
    change(config)
    return config


LOAD_ERRORS = {
    "top-level typo": (lambda c: c.update(expert=[]), ["unknown key 'expert'", "'experts'"]),
    "entry key typo": (lambda c: c["experts"][0].update(base_ur="http://x"),
                       ["experts[0] ('Chart-R1')", "unknown key 'base_ur'", "did you mean 'base_url'"]),
    "skill key typo": (lambda c: c["skills"][0].update(childs=[]), ["skills[0]", "'childs'"]),
    "duplicate name": (lambda c: c["experts"].append(dict(c["experts"][0])),
                       ["experts[4] ('Chart-R1')", "collides with experts[0] ('Chart-R1')"]),
    "duplicate after normalization": (
        lambda c: c["skills"].append({**c["skills"][0], "name": "chart-problem-solver"}),
        ["'chart-problem-solver' collides with skills[0] ('Chart_Problem_Solver')"]),
    "alias collides with a name": (lambda c: c["experts"][0].update(aliases=["glm-4.6v_flash"]),
                                   ["experts[1] ('GLM-4.6V-Flash')", "collides with experts[0] ('Chart-R1')"]),
    "alias with spaces": (lambda c: c["experts"][0].update(aliases=["chart r1"]),
                          ["alias 'chart r1'", "only letters, digits"]),
    "alias listed twice": (lambda c: c["experts"][1].update(aliases=["glm", "GLM"]),
                           ["'GLM' is listed twice in this entry"]),
    "router child unknown": (lambda c: c["skills"][3]["children"].append("No_Such_Skill"),
                             ["OCRBench_Master_Router_Skill", "child 'No_Such_Skill'"]),
    "router child not level 2": (lambda c: c["skills"][3]["children"].append("Chart_Problem_Solver"),
                                 ["child 'Chart_Problem_Solver' is level 1"]),
    "level 2 with children": (
        lambda c: c["skills"][4].update(children=["OCRBench_Scene_Text_QA_Skill"]),
        ["OCRBench_Key_Information_Extraction_Skill", "level-2 skill cannot have children"]),
    "router without default": (lambda c: c["skills"][3].pop("default_child"), ["default_child"]),
    "keywords for a non-child": (lambda c: c["skills"][3]["route_keywords"].update(Chart_Problem_Solver=["x"]),
                                 ["route_keywords names 'Chart_Problem_Solver'"]),
    "unreachable level 2": (lambda c: c["skills"][3]["children"].remove("OCRBench_Scene_Text_QA_Skill")
                            or c["skills"][3].update(default_child="OCRBench_Key_Information_Extraction_Skill"),
                            ["OCRBench_Scene_Text_QA_Skill", "nothing can reach it"]),
    "level 3": (lambda c: c["skills"][0].update(level=3), ["skills[0]", "'level' must be 1", "got 3"]),
    "level true": (lambda c: c["skills"][0].update(level=True), ["'level' must be 1"]),
    "implementation path": (lambda c: c["skills"][0].update(implementation="../evil:solve"),
                            ["implementation '../evil:solve'", "module:function"]),
    "implementation dotted": (lambda c: c["skills"][0].update(implementation="os.path:join"),
                              ["implementation 'os.path:join'"]),
    "implementation without function": (lambda c: c["skills"][0].update(implementation="chart"),
                                        ["implementation 'chart'"]),
    "expert without endpoint": (lambda c: c["experts"][0].pop("base_url"),
                                ["experts[0] ('Chart-R1')", "exactly one of 'base_url'", "'local_path'"]),
    "expert with both endpoints": (lambda c: c["experts"][0].update(local_path="m"), ["exactly one of"]),
    "malformed base_url": (lambda c: c["experts"][0].update(base_url="127.0.0.1:2364/v1"),
                           ["base_url '127.0.0.1:2364/v1'", "http(s) URL"]),
    "bad port": (lambda c: c["experts"][0].update(base_url="http://127.0.0.1:99999/v1"), ["invalid port"]),
    "service without endpoint": (lambda c: c["services"][0].pop("base_url"),
                                 ["services[0] ('ocr')", "missing required key 'base_url'"]),
    "unknown service": (lambda c: c["services"].append({"name": "speech", "base_url": "http://h/v1",
                                                        "model": "m"}), ["'speech'", "ocr, detection"]),
    "duplicate service": (lambda c: c["services"].append(dict(c["services"][0])), ["'ocr' is defined twice"]),
    "oracle unknown expert": (lambda c: c["oracle"].update(tallyqa=["GPT-5", "Chart_Problem_Solver"]),
                              ["oracle['tallyqa']", "unknown model 'GPT-5'"]),
    "oracle unknown skill": (lambda c: c["oracle"].update(tallyqa=["Chart-R1", "Counting"]),
                             ["oracle['tallyqa']", "unknown skill 'Counting'"]),
    "oracle shape": (lambda c: c["oracle"].update(tallyqa="Chart-R1"), ["expected [expert, skill]"]),
    "generation typo": (lambda c: c["experts"][0]["generation"].update(temprature=0.1),
                        ["unknown generation setting 'temprature'"]),
    "key instead of env var name": (lambda c: c["services"][0].update(api_key_env="sk-12345secret"),
                                    ["services[0] ('ocr')", "must name an environment variable"]),
    "wrong type": (lambda c: c["experts"][0].update(timeout="fast"), ["'timeout' must be a positive number"]),
    "name with grammar separator": (lambda c: c["experts"][0].update(name="Chart@@R1"), ["'Chart@@R1'"]),
    "missing description": (lambda c: c["skills"][0].pop("description"), ["missing required key 'description'"]),
    "prompt option typo": (lambda c: c.update(prompt={"max_call": 3}), ["prompt", "'max_call'"]),
    "nothing advertised": (lambda c: [e.update(advertised=False) for e in c["experts"]],
                           ["at least one advertised expert"]),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_load_refuses_bad_config(tmp_path, case):
    change, expected = LOAD_ERRORS[case]
    message = str(load_error(tmp_path, _mutate(change)))
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert "sk-12345secret" not in message


def test_invalid_json_names_line_and_column(tmp_path):
    text = json.dumps(base_config(), indent=2).replace('"level": 1,', '"level": 1', 1)
    message = str(load_error(tmp_path, text))
    assert "invalid JSON at line" in message and "column" in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(RegistryError, match="cannot read registry file"):
        Registry.load(tmp_path / "absent.json")


@pytest.fixture
def fake_skill_module(monkeypatch):
    """A skills.<name> module present in sys.modules, so importlib finds it like a real file."""
    module = types.ModuleType("skills.registry_test_solver")
    module.solve = lambda ctx: None
    module.not_a_function = 3
    monkeypatch.setitem(sys.modules, "skills.registry_test_solver", module)
    return module


def test_implementation_is_imported_and_checked(fake_skill_module, tmp_path):
    config = base_config()
    for skill in config["skills"]:
        skill["implementation"] = "registry_test_solver:solve"
    registry = Registry.from_dict(config)  # check_implementations defaults to True
    assert registry.skills["Chart_Problem_Solver"].implementation == "registry_test_solver:solve"

    config["skills"][0]["implementation"] = "registry_test_solver:not_a_function"
    with pytest.raises(RegistryError, match="has no function 'not_a_function'") as caught:
        Registry.from_dict(config)
    assert "Chart_Problem_Solver" in str(caught.value)

    config["skills"][0]["implementation"] = "no_such_module_xyz:solve"
    with pytest.raises(RegistryError, match=r"there is no module skills/no_such_module_xyz\.py"):
        Registry.from_dict(config)


def _missing_paper_modules() -> list[str]:
    implementations = {s["implementation"] for s in json.loads(PAPER_CONFIG.read_text())["skills"]}
    modules = sorted({impl.split(":")[0] for impl in implementations})
    return [m for m in modules if importlib.util.find_spec(f"skills.{m}") is None]


def test_paper_registry_loads_with_its_skill_modules():
    missing = _missing_paper_modules()
    if missing:
        pytest.skip(f"skills modules not written yet: {', '.join(f'skills/{m}.py' for m in missing)}")
    _check_paper_registry(Registry.load(PAPER_CONFIG))


def test_paper_registry_structure():
    _check_paper_registry(Registry.load(PAPER_CONFIG, check_implementations=False))


def _check_paper_registry(registry: Registry):
    assert [e.name for e in registry.advertised_experts()] == [
        "Intern-S1-mini", "GLM-4.6V-Flash", "qwen3-vl-8b-instruct", "Chart-R1", "medgemma-1.5-4b-it"]
    assert [s.name for s in registry.advertised_skills()] == [
        "Geometric_Problem_Solver", "Chart_Problem_Solver", "Science_Problem_Solver",
        "Counting_Problem_Solver", "Perception_Problem_Solver"]
    assert registry.resolve_expert("qwen3-VL-8B-Instruct").base_url == "http://127.0.0.1:2362/v1"
    assert registry.resolve_expert("qwen3-vl-8b-instruct").model == "qwen3-VL-8B-Instruct"
    assert registry.resolve_expert("Step3-VL-10B").base_url == "http://127.0.0.1:2382/v1"
    assert registry.resolve_expert("qwen3.5-9b").base_url == "http://127.0.0.1:2381/v1"
    assert all(e.generation == {"temperature": 0.2, "top_p": 1.0} for e in registry.experts.values())
    assert registry.resolve_skill("ocr_problem_solver").name == "OCRBench_Master_Router_Skill"
    assert registry.resolve_skill("Diagram_Reasoning_Skill").name == "VLMsAreBlind_Master_Router_Skill"
    assert registry.resolve_skill("OCRBench_Formula_Recognition_Skill").level == 2
    with pytest.raises(RegistryError) as caught:
        registry.resolve_skill("VLMsAreBlind_Grid_Structure_Parsing")
    assert caught.value.kind == "not_addressable"
    with pytest.raises(RegistryError):
        registry.resolve_skill("Key_Information_Extraction")
    assert set(registry.services) == {"ocr", "detection", "caption", "zoom"}
    assert registry.services["caption"].api_key_env is None
    assert registry.oracle["tallyqa"] == ("qwen3-vl-8b-instruct", "Counting_Problem_Solver")
    assert len(registry.oracle) == 7
    prompt = system_prompt(registry)
    assert "OCRBench" not in prompt and "Qwen3.5-9B" not in prompt and "Step3" not in prompt
