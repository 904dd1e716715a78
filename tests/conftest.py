import os

import pytest
import torch

# One thread: tests share two cores with each other's subprocesses, and torch's thread pool slows down
# badly when it competes for cores (see ../shared/LIGHTNING-NOTES.md).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
