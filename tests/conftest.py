import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models run faster on one thread (and two test processes may share the machine's cores);
# tests of the real model raise it themselves.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer and a chat template, saved like any model."""
    from helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))



@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one global state per process, fixed by the first Accelerator; a user runs
    one training per process, the suite runs many with different precisions."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def sizer_memory_off(request, monkeypatch):
    """Each test's drafters start from a fresh tree sizer, as their asserts on trees assume: what a
    sizer learnt in another test (or another run of the suite) is neither resumed nor kept. Tests
    marked `sizer_memory` use the memory, in a cache of their own."""
    if request.node.get_closest_marker("sizer_memory"):
        return
    from eaglespec.cost import SizerMemory

    monkeypatch.setattr(SizerMemory, "load", lambda self, sizer: False)
    monkeypatch.setattr(SizerMemory, "save", lambda self, sizer, force=False: False)

