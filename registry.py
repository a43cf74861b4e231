"""The model-skill registry: the one object that owns every expert, skill and service name.

A registry is loaded from JSON (configs/paper.json) and validated up front, so a typo fails at
start-up instead of mid-training. It resolves the names the policy writes -- exact match after
normalize_name, or a declared alias, never a substring guess -- and maestro.system_prompt renders
the policy's prompt from the same entries, so the prompt and what is callable cannot drift apart.

Skills come in two tiers. Level-1 skills are what the policy calls: complete solvers, or routers
that pick one of their Level-2 children from the words of the call. Level-2 skills are
specialists reached through a router; they are directly callable only when marked addressable.
"""
import difflib
import importlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit


class RegistryError(ValueError):
    """kind: 'unknown_model' | 'unknown_skill' | 'not_addressable' | 'config'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_SEPARATOR_RUNS = re.compile(r"[\s_\-]+")


def normalize_name(name: str) -> str:
    """Casefold and strip; every run of '-', '_' and whitespace becomes one '_'."""
    return _SEPARATOR_RUNS.sub("_", name.strip().casefold())


@dataclass(frozen=True)
class Expert:
    name: str
    aliases: tuple[str, ...]
    description: str
    base_url: str | None          # OpenAI-compatible endpoint, e.g. http://127.0.0.1:2364/v1
    model: str                    # served model name sent in requests
    api_key_env: str | None       # name of the env var holding the key, never the key itself
    local_path: str | None        # alternative to base_url: in-process transformers model dir
    generation: dict              # e.g. {"temperature": 0.2, "top_p": 1.0}
    timeout: float = 120.0
    max_retries: int = 2
    advertised: bool = True
    image_encoding: tuple = ("png", None)  # (format, JPEG quality) of images sent to it: the registry's image_encoding
    speciality: str | None = None  # its capability card: what it is good at (prompt option cards; the toy
                                   # experts' competence follows it)


@dataclass(frozen=True)
class Skill:
    name: str
    aliases: tuple[str, ...]
    level: int                    # 1 or 2
    description: str              # the "when to use" guideline shown to the policy
    implementation: str           # "module:function" inside the skills package, e.g. "chart:solve"
    children: tuple[str, ...] = ()                     # router: its Level-2 skills
    route_keywords: dict = field(default_factory=dict)  # router: child -> tuple of phrases
    default_child: str | None = None                   # router: child when no phrase matches
    example: str = ""             # a worked example input for the prompt
    advertised: bool = True
    addressable: bool = True
    task: str | None = None       # its capability card: the task it asks its expert to do (prompt option cards)


@dataclass(frozen=True)
class Service:
    name: str                     # 'ocr' | 'detection' | 'caption' | 'zoom'
    base_url: str
    model: str
    api_key_env: str | None
    generation: dict
    timeout: float
    max_retries: int
    image_encoding: tuple = ("png", None)


SERVICE_NAMES = ("ocr", "detection", "caption", "zoom")
GENERATION_KEYS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed",
                   "presence_penalty", "frequency_penalty", "repetition_penalty"}
DEFAULT_PROMPT_OPTIONS = {
    "max_calls": 4,
    "examples": True,
    "guidelines": True,
    "brief": False,            # True: names and format rules in three lines (a tiny policy pays per token)
    "cards": False,            # True: each name comes after its card, e.g. "bar: expert-7": speciality / task
    "preamble": None,
    "user_suffix": ("Plan first: decide what kind of question this is and which model and skill "
                    "suit it, then make the call. Keep the plan short and do not solve the "
                    "question yourself."),
}

# Names appear inside a call (maestro.format_call), so they may not contain the grammar's
# separators; letters, digits, '.', '_' and '-' cover every real model and skill name.
_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMPLEMENTATION = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):([A-Za-z_][A-Za-z0-9_]*)")

_EXPERT_KEYS = {"name", "aliases", "description", "base_url", "local_path", "model",
                "api_key_env", "generation", "timeout", "max_retries", "advertised", "speciality"}
_SKILL_KEYS = {"name", "aliases", "level", "description", "implementation", "children",
               "route_keywords", "default_child", "example", "advertised", "addressable", "task"}
_SERVICE_KEYS = {"name", "base_url", "model", "api_key_env", "generation", "timeout",
                 "max_retries"}
_TOP_LEVEL_KEYS = {"experts", "skills", "services", "oracle", "prompt", "image_encoding"}

_IS = {
    "a string": lambda v: isinstance(v, str),
    "a non-empty string": lambda v: isinstance(v, str) and v.strip() != "",
    "true or false": lambda v: isinstance(v, bool),
    "a positive number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
    "a positive integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "a non-negative integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "an object": lambda v: isinstance(v, dict),
}


def _config_error(where: str, what: str) -> RegistryError:
    return RegistryError("config", f"{where}: {what}")


def _check_keys(entry, allowed: set, required: tuple, where: str) -> None:
    if not isinstance(entry, dict):
        raise _config_error(where, f"expected a JSON object, got {type(entry).__name__}")
    for key in entry:
        if key not in allowed:
            hint = difflib.get_close_matches(key, sorted(allowed), n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise _config_error(where, f"unknown key '{key}'{did_you_mean}; "
                                       f"allowed keys: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in entry:
            raise _config_error(where, f"missing required key '{key}'")


def _get(entry: dict, key: str, expected: str, where: str, default=None):
    """entry[key] checked against one of the _IS descriptions (None when absent and allowed)."""
    if key not in entry:
        return default
    value = entry[key]
    if not _IS[expected](value):
        raise _config_error(where, f"'{key}' must be {expected}, got {json.dumps(value)}")
    return value


def _where(source: str, section: str, index: int, entry) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{source}: {section}[{index}]" + (f" ('{name}')" if isinstance(name, str) else "")


def _check_name(name: str, where: str, what: str = "name") -> None:
    if not _VALID_NAME.fullmatch(name):
        raise _config_error(where, f"{what} '{name}' must start with a letter or digit and contain "
                                   "only letters, digits, '.', '_' and '-'")


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _config_error(where, f"base_url '{url}' is not an http(s) URL with a host, "
                                   "e.g. http://127.0.0.1:2364/v1")
    try:
        parts.port  # raises on a non-numeric or out-of-range port
    except ValueError:
        raise _config_error(where, f"base_url '{url}' has an invalid port") from None


def _api_key_env(entry: dict, where: str) -> str | None:
    name = _get(entry, "api_key_env", "a non-empty string", where)
    if name is not None and not _ENV_VAR.fullmatch(name):
        # the value is deliberately not echoed: it may be a pasted key
        raise _config_error(where, "'api_key_env' must name an environment variable (e.g. "
                                   "OPENAI_API_KEY), never hold the key itself")
    return name


def _check_generation(generation: dict, where: str) -> None:
    for key, value in generation.items():
        if key not in GENERATION_KEYS:
            raise _config_error(where, f"unknown generation setting '{key}'; "
                                       f"allowed: {', '.join(sorted(GENERATION_KEYS))}")
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key != "stop" and not is_number:
            raise _config_error(where, f"generation setting '{key}' must be a number, "
                                       f"got {json.dumps(value)}")


def _check_implementation(implementation: str, where: str, import_it: bool) -> None:
    """Refuse an implementation that is not 'module:function' of a skills module (dots and slashes
    would reach outside the package); with import_it, the module must import and define it."""
    match = _IMPLEMENTATION.fullmatch(implementation)
    if not match:
        raise _config_error(where, f"implementation '{implementation}' must be 'module:function' "
                                   "naming a module of the skills package, e.g. 'chart:solve'")
    if not import_it:
        return
    module_name, function_name = match.groups()
    try:
        module = importlib.import_module(f"skills.{module_name}")
    except ModuleNotFoundError as error:
        if error.name == f"skills.{module_name}":
            raise _config_error(where, f"implementation '{implementation}': there is no module "
                                       f"skills/{module_name}.py") from None
        raise _config_error(where, f"importing skills.{module_name} failed: {error}") from error
    except Exception as error:
        raise _config_error(where, f"importing skills.{module_name} failed: {error}") from error
    if not callable(getattr(module, function_name, None)):
        raise _config_error(where, f"implementation '{implementation}': skills/{module_name}.py "
                                   f"has no function '{function_name}'")


def _parse_expert(entry, where: str, base_dir: Path | None) -> Expert:
    _check_keys(entry, _EXPERT_KEYS, ("name", "description"), where)
    name = _get(entry, "name", "a non-empty string", where)
    _check_name(name, where)
    base_url = _get(entry, "base_url", "a string", where)
    local_path = _get(entry, "local_path", "a non-empty string", where)
    if (base_url is None) == (local_path is None):
        raise _config_error(where, "expected exactly one of 'base_url' (an OpenAI-compatible "
                                   "endpoint) or 'local_path' (an in-process model directory)")
    if base_url is not None:
        _check_url(base_url, where)
    if local_path is not None and base_dir is not None:
        local_path = str(base_dir / local_path)  # relative to the config file, not the CWD
    generation = _get(entry, "generation", "an object", where, {})
    _check_generation(generation, where)
    return Expert(
        name=name,
        aliases=tuple(_get(entry, "aliases", "a list of strings", where, [])),
        description=_get(entry, "description", "a string", where),
        base_url=base_url,
        model=_get(entry, "model", "a non-empty string", where, name),
        api_key_env=_api_key_env(entry, where),
        local_path=local_path,
        generation=dict(generation),
        timeout=_get(entry, "timeout", "a positive number", where, 120.0),
        max_retries=_get(entry, "max_retries", "a non-negative integer", where, 2),
        advertised=_get(entry, "advertised", "true or false", where, True),
        speciality=_get(entry, "speciality", "a non-empty string", where),
    )


def _parse_skill(entry, where: str, check_implementations: bool) -> Skill:
    _check_keys(entry, _SKILL_KEYS, ("name", "level", "description", "implementation"), where)
    name = _get(entry, "name", "a non-empty string", where)
    _check_name(name, where)
    level = entry["level"]
    if level not in (1, 2) or isinstance(level, bool):
        raise _config_error(where, f"'level' must be 1 (callable solver or router) or 2 "
                                   f"(sub-skill of a router), got {json.dumps(level)}")
    implementation = _get(entry, "implementation", "a string", where)
    _check_implementation(implementation, where, import_it=check_implementations)
    keywords = _get(entry, "route_keywords", "an object", where, {})
    for child, phrases in keywords.items():
        if not _IS["a list of strings"](phrases) or not all(p.strip() for p in phrases):
            raise _config_error(where, f"route_keywords['{child}'] must be a list of non-empty "
                                       f"phrases, got {json.dumps(phrases)}")
    return Skill(
        name=name,
        aliases=tuple(_get(entry, "aliases", "a list of strings", where, [])),
        level=level,
        description=_get(entry, "description", "a string", where),
        implementation=implementation,
        children=tuple(_get(entry, "children", "a list of strings", where, [])),
        route_keywords={child: tuple(phrases) for child, phrases in keywords.items()},
        default_child=_get(entry, "default_child", "a non-empty string", where),
        example=_get(entry, "example", "a string", where, ""),
        advertised=_get(entry, "advertised", "true or false", where, True),
        addressable=_get(entry, "addressable", "true or false", where, level == 1),
        task=_get(entry, "task", "a non-empty string", where),
    )


def _parse_service(entry, where: str) -> Service:
    _check_keys(entry, _SERVICE_KEYS, ("name", "base_url", "model"), where)
    name = _get(entry, "name", "a string", where)
    if name not in SERVICE_NAMES:
        raise _config_error(where, f"service name '{name}' must be one of {', '.join(SERVICE_NAMES)}")
    base_url = _get(entry, "base_url", "a string", where)
    _check_url(base_url, where)
    generation = _get(entry, "generation", "an object", where, {})
    _check_generation(generation, where)
    return Service(
        name=name,
        base_url=base_url,
        model=_get(entry, "model", "a non-empty string", where),
        api_key_env=_api_key_env(entry, where),
        generation=dict(generation),
        timeout=_get(entry, "timeout", "a positive number", where, 120.0),
        max_retries=_get(entry, "max_retries", "a non-negative integer", where, 2),
    )


def _image_encoding(entry, where: str) -> tuple:
    """'image_encoding': {"format": "png"} (lossless, the default) or {"format": "jpeg", "quality": 1-100}
    (what upstream sent: its experts saw JPEG re-encodings at PIL's default quality 75)."""
    if not isinstance(entry, dict) or entry.get("format") not in ("png", "jpeg") or set(entry) - {"format", "quality"}:
        raise _config_error(where, f"'image_encoding' must be {{\"format\": \"png\"}} or {{\"format\": \"jpeg\", "
                                   f"\"quality\": 1-100}}, got {json.dumps(entry)}")
    quality = entry.get("quality", 75 if entry["format"] == "jpeg" else None)
    if entry["format"] == "jpeg" and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100):
        raise _config_error(where, f"image_encoding quality must be an integer from 1 to 100, got {json.dumps(quality)}")
    return entry["format"], quality


def _name_index(entries, section: str, source: str) -> dict[str, str]:
    """normalize_name(name or alias) -> canonical name; any collision is a config error."""
    owner: dict[str, int] = {}  # normalized spelling -> position of the entry that claimed it
    for position, entry in enumerate(entries):
        where = f"{source}: {section}[{position}] ('{entry.name}')"
        for spelling in (entry.name, *entry.aliases):
            _check_name(spelling, where, "alias" if spelling != entry.name else "name")
            key = normalize_name(spelling)
            if key in owner:
                other = entries[owner[key]]
                clash = ("is listed twice in this entry" if owner[key] == position else
                         f"collides with {section}[{owner[key]}] ('{other.name}')")
                raise _config_error(where, f"'{spelling}' {clash}; names and aliases are compared "
                                           f"as '{key}' and must all be unique")
            owner[key] = position
    return {key: entries[position].name for key, position in owner.items()}


class Registry:
    """Experts, skills and services by canonical name, plus name resolution and prompt options."""

    def __init__(self, experts, skills, services=(), oracle=None, prompt_options=None,
                 source: str = "<dict>"):
        self.source = source
        self.experts: dict[str, Expert] = {e.name: e for e in experts}
        self.skills: dict[str, Skill] = {s.name: s for s in skills}
        self._expert_index = _name_index(experts, "experts", source)
        self._skill_index = _name_index(skills, "skills", source)
        self.services: dict[str, Service] = {}
        for service in services:
            if service.name in self.services:
                raise _config_error(source, f"service '{service.name}' is defined twice")
            self.services[service.name] = service
        self._check_skill_tree()
        self.expert_origin: dict[str, str] = {}  # a view's name -> the name in the registry it was drawn
        self.skill_origin: dict[str, str] = {}   # from (Registry.renamed); empty for a loaded registry
        self.oracle: dict[str, tuple[str, str]] = {
            family: self._oracle_pair(family, pair) for family, pair in (oracle or {}).items()}
        options = prompt_options or {}
        self._check_prompt_options(options)
        self.prompt_options = {**DEFAULT_PROMPT_OPTIONS, **options}
        if not self.advertised_experts() or not self.advertised_skills():
            raise _config_error(source, "the policy prompt needs at least one advertised expert "
                                        "and one advertised, addressable skill")

    @classmethod
    def load(cls, path, check_implementations: bool = True) -> "Registry":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise RegistryError("config", f"cannot read registry file {path}: {error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RegistryError("config", f"{path}: invalid JSON at line {error.lineno}, column "
                                          f"{error.colno}: {error.msg}") from None
        return cls.from_dict(data, source=str(path), check_implementations=check_implementations,
                             base_dir=path.resolve().parent)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>", check_implementations: bool = True,
                  base_dir: Path | None = None) -> "Registry":
        """check_implementations=False skips importing the skills modules (format still checked)."""
        _check_keys(data, _TOP_LEVEL_KEYS, ("experts", "skills"), source)
        sections = {}
        for section in ("experts", "skills", "services"):
            entries = data.get(section, [])
            if not isinstance(entries, list):
                raise _config_error(source, f"'{section}' must be a list of objects")
            sections[section] = entries
        experts = [_parse_expert(e, _where(source, "experts", i, e), base_dir)
                   for i, e in enumerate(sections["experts"])]
        skills = [_parse_skill(s, _where(source, "skills", i, s), check_implementations)
                  for i, s in enumerate(sections["skills"])]
        services = [_parse_service(s, _where(source, "services", i, s))
                    for i, s in enumerate(sections["services"])]
        encoding = _image_encoding(data.get("image_encoding", {"format": "png"}), source)
        experts = [replace(e, image_encoding=encoding) for e in experts]
        services = [replace(s, image_encoding=encoding) for s in services]
        oracle = data.get("oracle", {})
        prompt_options = data.get("prompt", {})
        for key, value in (("oracle", oracle), ("prompt", prompt_options)):
            if not isinstance(value, dict):
                raise _config_error(source, f"'{key}' must be an object")
        return cls(experts, skills, services, oracle, prompt_options, source)

    # ---- validation across entries ----

    def _check_skill_tree(self) -> None:
        for skill in self.skills.values():
            where = f"{self.source}: skill '{skill.name}'"
            if skill.level == 2 and (skill.children or skill.route_keywords or skill.default_child):
                raise _config_error(where, "a level-2 skill cannot have children, route_keywords "
                                           "or default_child; only level-1 routers route")
            if skill.level == 1 and not skill.addressable:
                raise _config_error(where, "a level-1 skill must be addressable: nothing else "
                                           "can reach it")
            for child in skill.children:
                if child not in self.skills:
                    raise _config_error(where, f"child '{child}' is not a skill name; write the "
                                               "canonical name of a level-2 skill")
                if self.skills[child].level != 2:
                    raise _config_error(where, f"child '{child}' is level "
                                               f"{self.skills[child].level}; children must be level 2")
            if len(set(skill.children)) != len(skill.children):
                raise _config_error(where, "a child is listed twice in 'children'")
            for child in skill.route_keywords:
                if child not in skill.children:
                    raise _config_error(where, f"route_keywords names '{child}', which is not "
                                               f"one of its children: {', '.join(skill.children)}")
            if skill.children and skill.default_child not in skill.children:
                raise _config_error(where, f"a router needs 'default_child' set to one of its "
                                           f"children ({', '.join(skill.children)}), got "
                                           f"{json.dumps(skill.default_child)}")
            if not skill.children and (skill.route_keywords or skill.default_child):
                raise _config_error(where, "route_keywords and default_child need 'children'")
            if skill.level == 2 and not skill.addressable and not self.routers_of(skill.name):
                raise _config_error(where, "this level-2 skill is not addressable and no router "
                                           "lists it as a child, so nothing can reach it")

    def _oracle_pair(self, family: str, pair) -> tuple[str, str]:
        where = f"{self.source}: oracle['{family}']"
        if not (_IS["a list of strings"](pair) and len(pair) == 2):
            raise _config_error(where, f"expected [expert, skill], got {json.dumps(pair)}")
        try:
            expert, skill = self.resolve(*pair)
        except RegistryError as error:
            raise _config_error(where, str(error)) from None
        return expert.name, skill.name

    def _check_prompt_options(self, options: dict) -> None:
        where = f"{self.source}: prompt"
        _check_keys(options, set(DEFAULT_PROMPT_OPTIONS), (), where)
        _get(options, "max_calls", "a positive integer", where)
        _get(options, "examples", "true or false", where)
        _get(options, "guidelines", "true or false", where)
        _get(options, "brief", "true or false", where)
        _get(options, "cards", "true or false", where)
        _get(options, "preamble", "a non-empty string", where)
        _get(options, "user_suffix", "a string", where)

    # ---- name resolution ----

    def routers_of(self, skill_name: str) -> list[str]:
        """Names of the routers that list skill_name as a child."""
        return [s.name for s in self.skills.values() if skill_name in s.children]

    def advertised_experts(self) -> list[Expert]:
        return [e for e in self.experts.values() if e.advertised]

    def advertised_skills(self) -> list[Skill]:
        return [s for s in self.skills.values() if s.advertised and s.addressable]

    def _valid_expert_names(self) -> list[str]:
        experts = list(self.experts.values())
        return [e.name for e in experts if e.advertised] + [e.name for e in experts if not e.advertised]

    def _valid_skill_names(self) -> list[str]:
        callable_skills = [s for s in self.skills.values() if s.addressable]
        return ([s.name for s in callable_skills if s.advertised]
                + [s.name for s in callable_skills if not s.advertised])

    def resolve_expert(self, name: str) -> Expert:
        canonical = self._expert_index.get(normalize_name(name)) if isinstance(name, str) else None
        if canonical is None:
            raise RegistryError("unknown_model", f"unknown model '{name}'; valid models: "
                                                 f"{', '.join(self._valid_expert_names())}")
        return self.experts[canonical]

    def resolve_skill(self, name: str) -> Skill:
        canonical = self._skill_index.get(normalize_name(name)) if isinstance(name, str) else None
        if canonical is None:
            raise RegistryError("unknown_skill", f"unknown skill '{name}'; valid skills: "
                                                 f"{', '.join(self._valid_skill_names())}")
        skill = self.skills[canonical]
        if not skill.addressable:
            routers = " or ".join(self.routers_of(canonical))
            raise RegistryError("not_addressable", f"skill '{canonical}' cannot be called directly; "
                                                   f"it is reached through {routers}, call that instead")
        return skill

    def resolve(self, model: str, skill: str) -> tuple[Expert, Skill]:
        return self.resolve_expert(model), self.resolve_skill(skill)

    # ---- views: the same cards under other names ----

    def renamed(self, experts: dict, skills: dict) -> "Registry":
        """A view of this registry: the experts named in `experts` ({name: new name}, in the order the
        prompt lists them; the others are left out) and the skills named in `skills` (in order, each
        router's children with it; the others are left out), renamed. Routers' children and keywords follow their renames,
        aliases are dropped, and cards, implementations and served models stay: a toy expert's
        competence follows its card, so a view is the same world under other names. The view's
        expert_origin and skill_origin map each new name back to this registry's."""
        orphans = {c for name in skills if name in self.skills for c in self.skills[name].children} - set(skills)
        if not set(skills) <= set(self.skills) or not set(experts) <= set(self.experts) or orphans:
            raise ValueError(f"a view renames a subset of the experts {sorted(self.experts)} and a subset of the "
                             f"skills {sorted(self.skills)} that holds each router's children; got experts "
                             f"{sorted(experts)} and skills {sorted(skills)}")
        view_experts = [replace(self.experts[name], name=new, aliases=()) for name, new in experts.items()]
        view_skills = []
        for name, new in skills.items():
            skill = self.skills[name]
            view_skills.append(replace(skill, name=new, aliases=(), children=tuple(skills[c] for c in skill.children),
                                       route_keywords={skills[c]: k for c, k in skill.route_keywords.items()},
                                       default_child=skills.get(skill.default_child)))
        oracle = {family: [experts[e], skills[k]] for family, (e, k) in self.oracle.items()
                  if e in experts and k in skills}
        options = {key: value for key, value in self.prompt_options.items() if value is not None}  # None: default
        view = Registry(view_experts, view_skills, self.services.values(), oracle, options,
                        f"{self.source} (renamed view)")
        view.expert_origin = {new: name for name, new in experts.items()}
        view.skill_origin = {new: name for name, new in skills.items()}
        return view


def view_ids(text: str, heldout: str = ""):
    """The ids of renamed views from a config value: 'A-B' -> [A, ..., B]; '' -> None (no views).
    heldout: a registry file whose expert-N / skill-N names must never occur in training: their ids
    are left out (configs/toy_registry.json holds out configs/toy_unseen.json's)."""
    if not text:
        if heldout:
            raise ValueError(f"heldout_registry {heldout!r} is set but registry_views is not: ids are held out "
                             "of renamed views only (set registry_views, e.g. '10-99')")
        return None
    low, dash, high = text.partition("-")
    if not (dash and low.isdigit() and high.isdigit() and int(low) <= int(high)):
        raise ValueError(f"registry_views: expected ids 'A-B' (e.g. '10-99': names expert-10 .. skill-99) "
                         f"or '' for none, got {text!r}")
    held = set()
    if heldout:
        registry = Registry.load(heldout)
        for name in [*registry.experts, *registry.skills]:
            kind, _, number = name.partition("-")
            if kind in ("expert", "skill") and number.isdigit():
                held.add(int(number))
    return [n for n in range(int(low), int(high) + 1) if n not in held]


def draw_view(registry: Registry, rng, ids, family: str | None = None, grown: float = 1.0) -> Registry:
    """A random view of `registry` for one prompt group: every expert and skill gets a fresh id
    (expert-N, skill-N, N drawn from `ids` without repeats) and the cards come in shuffled order.
    The pair the oracle uses for the sample's `family` (every family's pairs when it has none or the
    oracle does not know it) is always in the view; of the other experts and Level-1 skills a random
    subset of 1 to `grown` x all of them (at least one, when there is one, so that the view asks for a
    choice; grown < 1 is the view-size curriculum: small views first, where a random call fits often).
    The prompt lists the Level-1 skills; a router's Level-2 children come with it."""
    pairs = [registry.oracle[family]] if family in registry.oracle else list(registry.oracle.values())
    needed = {expert for expert, _ in pairs if registry.experts[expert].advertised}
    if not needed:
        raise ValueError(f"{registry.source}: renamed views keep the experts of the registry's 'oracle' and draw "
                         "distractors from the others; this registry has no advertised oracle expert")

    def needed_and_some(names, needed):
        others = [name for name in names if name not in needed]
        most = max(1, round(grown * len(others))) if others else 0
        chosen = [name for name in names if name in needed] + rng.sample(others, rng.randint(min(1, most), most))
        rng.shuffle(chosen)
        return chosen

    experts = needed_and_some(list(registry.experts), needed)
    level_1 = needed_and_some([name for name, skill in registry.skills.items() if skill.level == 1],
                              {skill for _, skill in pairs})
    level_2 = [name for name, skill in registry.skills.items()
               if skill.level == 2 and any(name in registry.skills[router].children for router in level_1)]
    if len(ids) < max(len(experts), len(level_1) + len(level_2)):
        raise ValueError(f"a view needs {max(len(experts), len(level_1) + len(level_2))} distinct ids, got {len(ids)}")
    expert_ids, skill_ids = rng.sample(list(ids), len(experts)), rng.sample(list(ids), len(level_1) + len(level_2))
    return registry.renamed({name: f"expert-{n}" for name, n in zip(experts, expert_ids)},
                            {name: f"skill-{n}" for name, n in zip(level_1 + level_2, skill_ids)})
