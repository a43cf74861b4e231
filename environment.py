"""The environment that runs the policy's calls. `Environment.step` executes one turn of actions for
a batch of samples, concurrently: a search action resolves its names against the registry and runs
that skill on that expert (skills/). Nothing there raises on bad policy output or on failing
experts: every failure becomes an error observation (maestro.format_error) with a typed
StepResult.error, and a failed expert request keeps its ExpertError.kind in the Call that records it.

`make_environment` is the one construction train.py and eval.py share; `demonstration_turns` the
format warm-up's demonstrations of any world (a random pair called, what its reply answers copied as the answer).
"""

from dataclasses import dataclass, field

from experts import ExpertError, Services, run_concurrently
from maestro import (ERROR_KINDS, PROTOCOLS, answer_in_reply, format_answer, format_call, format_error,
                     format_observation, format_upstream_observation, neutralize_tags, parse_action, reply_of)
from registry import RegistryError
from skills import SkillContext, run_skill


@dataclass
class StepResult:
    observation: str                  # the whole information block the policy reads next
    calls: list = field(default_factory=list)   # experts.Call records of this step
    error: str = ""                   # '' or one of ERROR_KINDS
    path: tuple = ()                  # skill names taken (router, child)
    expert: str = ""                  # canonical expert name in the sample's registry, '' when not resolved
    skill: str = ""                   # canonical skill name in the sample's registry, '' when not resolved



# ----------------------------------------------------------------------------------------------
# Environment

class Environment:
    """Executes the policy's actions: one search action -> one skill run on one expert.

    `step` runs all calls of a turn concurrently (at most `max_parallel` at a time per expert, so
    a dead or slow expert holds only its own workers and never delays calls to the others) and never
    raises for anything the policy or an expert does: invalid actions, unknown names, expert
    failures and skill exceptions become error observations (StepResult.error, one of ERROR_KINDS;
    an expert failure's ExpertError.kind, 'timeout', 'http_5xx', ..., is in its Call). The sample's
    ground truth never reaches a skill.
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

    def step(self, actions, samples):
        """actions[i] was taken on samples[i]; returns one StepResult per action, in order.
        Answer actions end the episode and get an empty StepResult (no observation)."""
        if len(actions) != len(samples):
            raise ValueError(f"step got {len(actions)} actions for {len(samples)} samples")
        queues = {}  # expert name ('' when unknown) -> indices of the actions calling it
        for i, action in enumerate(actions):
            if action.kind == "search":
                queues.setdefault(self._backend_name(action.model, samples[i]), []).append(i)

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
                result = by_index[i]
            results.append(result)
        return results

    def registry_of(self, sample):
        """The registry a sample's policy prompt lists: its own view (Sample.registry) or the environment's."""
        return sample.registry or self.registry

    def _backend_name(self, model, sample):
        """The backend that serves the expert a sample's call names ('' when it names none): a view
        (Sample.registry, drawn from this environment's registry) renames experts, backends keep
        the environment registry's names."""
        try:
            name = self.registry_of(sample).resolve_expert(model).name
        except RegistryError:
            return ""
        return sample.registry.expert_origin[name] if sample.registry else name

    def _error(self, error, message, **fields):
        return StepResult(observation=format_error(error, message, self.tokenizer, self.obs_token_budget),
                          error=error, **fields)

    def _call(self, action, sample):
        """Run one search action -> StepResult."""
        registry = self.registry_of(sample)  # names resolve against what this sample's prompt listed
        try:
            expert, skill = registry.resolve(action.model, action.skill)
        except RegistryError as e:  # unknown_model | unknown_skill | not_addressable
            kind = e.kind if e.kind in ERROR_KINDS else "skill_error"
            return self._error(kind, neutralize_tags(str(e)))
        names = {"expert": expert.name, "skill": skill.name}
        ctx = SkillContext(registry=registry, skill=skill, expert=self.backends[self._backend_name(expert.name, sample)],
                           services=self.services, query=action.query, images=sample.images)
        try:
            result = run_skill(ctx)
        except ExpertError as e:  # e.calls: what the skill spent before the failure
            return self._error("expert_error", neutralize_tags(
                f"The call to {expert.name} failed ({e.kind}): {e}. This is not a mistake in your "
                "request; you may retry, use another expert, or answer."),
                calls=list(e.calls), **names)
        except Exception as e:
            return self._error("skill_error", neutralize_tags(
                f"The skill {skill.name} failed: {type(e).__name__}: {e}. This is not a mistake in "
                "your request; you may retry, use another skill, or answer."), **names)
        observation = (format_upstream_observation(result.text) if self.protocol == "upstream"
                       else format_observation(result.text, self.tokenizer, self.obs_token_budget))
        return StepResult(observation=observation, calls=list(result.calls), path=tuple(result.path), **names)

    @property
    def max_calls(self):
        """The calls a trajectory may make: the registry prompt's max_calls (RolloutConfig.max_turns None)."""
        return self.registry.prompt_options["max_calls"]


def make_environment(world, tokenizer, protocol="ours", obs_tokens=1024):
    """The one Environment of a world (data.World) that train.py and eval.py both use."""
    return Environment(world.registry, world.backends, Services(world.registry.services), tokenizer, obs_tokens,
                       protocol=protocol)


def demonstration_turns(sample, env, rng, request_of=None):
    """Format warm-up turns for any world: a call to a uniformly random advertised (expert, skill)
    pair sending request_of(question) (None: the question itself), then an answer that copies what
    the reply answers (maestro.answer_in_reply). The pair is random (among the sample's own registry
    view when it has one): no routing supervision. After an expert's failure (or a reply with no
    answer in it) the pair is drawn again without that expert, after a skill's failure without that
    skill; a call the request itself makes invalid stops the warm-up with a message.
    Returns ([call, answer], [the call's StepResult]): rollout.trajectory_from_texts shows the policy
    that very reply (an expert sampled again could say something else)."""
    registry = env.registry_of(sample)
    experts, skills = registry.advertised_experts(), registry.advertised_skills()
    while experts and skills:
        expert, skill = rng.choice(experts), rng.choice(skills)
        call = format_call(expert.name, skill.name, request_of(sample.question) if request_of else sample.question)
        [result] = env.step([parse_action(call)], [sample])
        answer = format_answer(answer_in_reply(reply_of(result.observation)))
        if not result.error and parse_action(answer).kind == "answer":
            return [call, answer], [result]
        if result.error == "skill_error":
            skills = [s for s in skills if s is not skill]
        elif result.error in ("", "expert_error"):
            experts = [e for e in experts if e is not expert]
        else:
            raise ValueError(f"format warm-up: the demonstration call for sample {sample.id!r} is invalid "
                             f"({result.error}): {reply_of(result.observation)[:300]} -- its request is the "
                             "question (or the world's request_of of it)")
    raise RuntimeError(f"format warm-up: every advertised {'expert' if skills else 'skill'} failed a demonstration "
                       f"call for sample {sample.id!r}; the last: {reply_of(result.observation)[:300]} -- are the "
                       "experts reachable?")
