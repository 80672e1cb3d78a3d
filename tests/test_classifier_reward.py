"""classifier:MODEL[:LABEL[:logit|prob]] on tiny random classifiers saved to tmp_path."""

import math

import numpy as np
import pytest
import torch

from alignkit.errors import AlignkitError
from alignkit.rewards import build_reward
from alignkit.rewards.classifier import ClassifierReward, parse_spec

TEXTS = ["You are kind.", "Shut up, idiot, nobody likes you at all!", "ok"]
PROMPTS = [[{"role": "user", "content": "hi"}]] * len(TEXTS)


pytestmark = pytest.mark.usefixtures("one_thread")


def _save_classifier(folder, num_labels, id2label=None, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignkit.models import load_tokenizer

    tok = load_tokenizer("tiny:llama", padding_side="right")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if id2label:
        config.id2label = id2label
        config.label2id = {v: k for k, v in id2label.items()}
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a visible spread between labels and between texts
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def hate_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hate-clf")
    model, tok = _save_classifier(folder, 2, {0: "hate", 1: "nothate"})
    return folder, model.eval(), tok


def _unpadded_logits(model, tok, text):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits[0]


def test_logit_of_the_named_label_matches_each_text_scored_alone(hate_model):
    folder, model, tok = hate_model
    # batch_size 2: the first batch pads the short texts; scores must not depend on it
    reward = ClassifierReward(str(folder), "nothate", batch_size=2)
    scores = reward(PROMPTS, TEXTS)
    expected = [float(_unpadded_logits(model, tok, t)[1]) for t in TEXTS]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(scores, 4))) == 3  # a real spread, not a constant
    assert reward.name.endswith(":nothate:logit")


def test_probability_is_the_softmax_share_of_the_label(hate_model):
    folder, model, tok = hate_model
    p_not = build_reward(f"classifier:{folder}:nothate:prob")(PROMPTS, TEXTS)
    p_hate = build_reward(f"classifier:{folder}:hate:prob")(PROMPTS, TEXTS)
    np.testing.assert_allclose(p_not + p_hate, 1.0, atol=1e-6)
    # two labels: softmax share = sigmoid(l_nothate - l_hate)
    for text, p in zip(TEXTS, p_not):
        l_hate, l_not = _unpadded_logits(model, tok, text).tolist()
        assert p == pytest.approx(1 / (1 + math.exp(-(l_not - l_hate))), abs=1e-5)


def test_label_by_index_or_any_case_is_the_same_label(hate_model):
    folder, _, _ = hate_model
    by_name = build_reward(f"classifier:{folder}:nothate")(PROMPTS, TEXTS)
    np.testing.assert_array_equal(build_reward(f"classifier:{folder}:1")(PROMPTS, TEXTS), by_name)
    np.testing.assert_array_equal(build_reward(f"classifier:{folder}:NotHate")(PROMPTS, TEXTS), by_name)


def test_label_errors_list_the_labels(hate_model):
    folder, _, _ = hate_model
    with pytest.raises(AlignkitError, match="no label 'toxic'; its labels: hate, nothate"):
        build_reward(f"classifier:{folder}:toxic")
    with pytest.raises(AlignkitError, match="has 2 labels .*name one"):
        build_reward(f"classifier:{folder}")


def test_a_missing_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the network in tests
    with pytest.raises(AlignkitError, match="cannot load 'no-such-org/no-such-model'") as e:
        build_reward("classifier:no-such-org/no-such-model:nothate")
    assert "\n" not in str(e.value)


def test_single_output_model_needs_no_label(tmp_path):
    model, tok = _save_classifier(tmp_path, 1)
    logits = build_reward(f"classifier:{tmp_path}")(PROMPTS, TEXTS)
    probs = build_reward(f"classifier:{tmp_path}:prob")(PROMPTS, TEXTS)
    expected = [float(_unpadded_logits(model.eval(), tok, t)[0]) for t in TEXTS]
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-np.asarray(expected))), atol=1e-6)


def test_parse_spec():
    assert parse_spec("org/model:nothate") == ("org/model", "nothate", "logit")
    assert parse_spec("org/model:1:prob") == ("org/model", "1", "prob")
    assert parse_spec("org/model") == ("org/model", None, "logit")
    with pytest.raises(AlignkitError, match="needs a model"):
        parse_spec("")
