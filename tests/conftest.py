import os
import sys
from pathlib import Path

# Nothing in the tests may touch the Hugging Face hub: fail fast instead of retrying for 23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
