import os
import sys
from pathlib import Path

# Nothing in the tests may touch the Hugging Face hub: fail fast instead of retrying for 23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The toy policy (tiny, random weights) saved once, loaded by every test that needs it."""
    import toyworld
    from policy import save_policy
    from registry import Registry

    path = tmp_path_factory.mktemp("tiny_policy")
    model, processor = toyworld.build_toy_policy(Registry.load(Path(__file__).resolve().parent.parent / "configs/toy.json"), "tiny", seed=0)
    save_policy(model, processor, path)
    return path


@pytest.fixture(scope="session")
def demos(tiny_dir):
    """(processor, registry, env, 8 teacher-forced random-pair demonstrations of the tiny policy)."""
    import random

    import toyworld
    from environment import Environment, demonstration_turns
    from experts import Services
    from policy import load_policy
    from registry import Registry
    from rollout import trajectory_from_texts

    _, processor = load_policy(tiny_dir)
    registry = Registry.load(Path(__file__).resolve().parent.parent / "configs/toy.json")
    env = Environment(registry, toyworld.toy_backends(registry), Services({}), processor.tokenizer)
    rng = random.Random(0)
    samples = toyworld.make_samples("train", 8, seed=0)
    trajectories = [trajectory_from_texts(processor, s, env, *demonstration_turns(s, env, rng, toyworld.request_of))
                    for s in samples]
    return processor, registry, env, trajectories
