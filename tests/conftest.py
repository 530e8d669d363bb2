import os

import pytest
import torch

# session fixtures used by name in several test files
pytest_plugins = ["tests.fixtures.qwen_tokenizer", "tests.fixtures.tiny_qwen", "tests.fixtures.log_capture"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
