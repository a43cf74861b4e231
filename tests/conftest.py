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
