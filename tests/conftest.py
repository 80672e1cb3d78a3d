import os

import pytest

os.environ.setdefault("ALIGNKIT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from alignkit.models import load_tokenizer

    return load_tokenizer("tiny:llama", padding_side="right")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
    OpenMP workers make them several times slower: a module uses this to run on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def forward_tokens():
    """``watch(model) -> tokens``: each call of ``model`` appends how many tokens it runs, its new
    columns' attention (a KV cache's columns and padding not counted). Unhooked after the test."""
    hooks = []

    def watch(model) -> list[int]:
        tokens: list[int] = []

        def count(module, args, kwargs):
            tokens.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum()))

        hooks.append(model.register_forward_pre_hook(count, with_kwargs=True))
        return tokens

    yield watch
    for hook in hooks:
        hook.remove()
