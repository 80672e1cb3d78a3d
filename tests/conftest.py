import os

import pytest

os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from alignkit.models import load_tokenizer

    return load_tokenizer("tiny:llama", padding_side="right")
