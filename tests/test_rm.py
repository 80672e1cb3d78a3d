"""alignkit rm: rankings feeding the loss, grouping, the saved model in plain transformers, rm: rewards."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit import cli
from alignkit.config import ModelConfig, load_config
from alignkit.data.formats import LabelerRanking, PreferencePair, RankingItem, ranking_to_pairs
from alignkit.errors import AlignkitError
from alignkit.losses import pairwise_loss, reward_centering_loss
from alignkit.recipes import rm
from alignkit.rewards import build_reward
from alignkit.rewards.model import RMInput
from alignkit.runs import read_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DATA = Path(__file__).resolve().parent / "data"
TINY = str(CONFIGS / "rm-tiny.yaml")
PROMPTS = [[{"role": "user", "content": "How do I cook pasta?"}]] * 3 + [[{"role": "user", "content": "Hi"}]]
RESPONSES = ["Use a big pot of salted water, please enjoy!", "Shut up, idiot.", "Boil it.", "Hello there!"]


class LookupScorer(torch.nn.Module):
    """A stand-in reward model: the score of a text is looked up; counts the rows it scores."""

    def __init__(self, table: dict[tuple, float], pad_id: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.table, self.pad_id, self.rows = table, pad_id, 0

    def forward(self, input_ids, attention_mask, **kw):
        self.rows += input_ids.shape[0]
        keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask)]
        scores = torch.tensor([self.table[k] for k in keys]) + self.bias
        return type("Out", (), {"logits": scores[:, None]})()


def test_ranking_expansion_feeds_the_loss(tiny_tokenizer):
    prompt = [{"role": "user", "content": "Describe the sea."}]
    texts = ("The sea is vast and blue.", "Salty, deep and full of life.", "The sea is stupid.")
    item = RankingItem(prompt, texts, (LabelerRanking("ann", (2, 1, 3)),), "r.jsonl:line 1")
    pairs = ranking_to_pairs(item, group=0)
    rm_input = RMInput(tiny_tokenizer, "chat", 256)
    data = rm.encode_pairs(rm_input, pairs, "raise")
    assert data.units == [[0, 1, 2]] and len(data.texts) == 3  # C(3,2) pairs, 3 distinct texts

    scores = {texts[0]: 0.5, texts[1]: 1.5, texts[2]: -1.0}
    table = {tuple(rm_input.encode(prompt, t)["input_ids"]): s for t, s in scores.items()}
    model = LookupScorer(table, tiny_tokenizer.pad_token_id)
    r_c, r_r = rm.score_pairs(model, rm_input, data, [0, 1, 2])
    assert model.rows == 3  # each completion scored once, not once per pair

    # Best first: texts[1] (rank 1) > texts[0] (rank 2) > texts[2] (rank 3); chosen-minus-rejected
    # gaps are 1.5-0.5 = 1.0, 1.5-(-1) = 2.5, 0.5-(-1) = 1.5 (in some order), rank gaps 1, 2, 1.
    gaps = sorted((r_c - r_r).tolist())
    assert gaps == pytest.approx([1.0, 1.5, 2.5])
    loss, m = pairwise_loss(r_c, r_r)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.5)) + math.log1p(math.exp(-1.5))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6) and m["accuracy"] == 1.0
    margins = torch.tensor(data.margins)
    loss_m, _ = pairwise_loss(r_c, r_r, margins)
    # With the rank gap as margin every pair's logit drops by its gap: 1.0-1, 2.5-2, 1.5-1.
    expected_m = (math.log(2) + 2 * math.log1p(math.exp(-0.5))) / 3
    assert loss_m.item() == pytest.approx(expected_m, rel=1e-6)


def test_reward_centering_penalty_by_hand():
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0])
    penalty, m = reward_centering_loss(chosen, rejected)
    assert penalty.item() == pytest.approx((0.0 ** 2 + 2.0 ** 2) / 2)  # (1-1)^2, (2+0)^2
    # Bradley-Terry alone cannot see a shared shift; the penalty can.
    shifted = reward_centering_loss(chosen + 3, rejected + 3)[0]
    assert pairwise_loss(chosen + 3, rejected + 3)[0].item() == pytest.approx(pairwise_loss(chosen, rejected)[0].item())
    assert shifted.item() > penalty.item()
    assert m["mean_score"] == pytest.approx(0.5)


def test_ranking_pairs_stay_together_in_batches_and_splits():
    cfg = load_config(rm.Config, TINY, ["data.path=synthetic:rankings?n=20&k=4", "data.eval_fraction=0.25"])
    train, held = rm.load_pairs(cfg)
    assert len(train) == 15 * 6 and len(held) == 5 * 6  # C(4,2) pairs per ranking
    assert not {p.group for p in train} & {p.group for p in held}
    units = rm.units_of(train)
    assert len(units) == 15 and all(len({train[i].group for i in u}) == 1 and len(u) == 6 for u in units)
    lone = rm.units_of(rm.load_pairs(load_config(rm.Config, TINY, ["data.eval_fraction=0"]))[0])
    assert all(len(u) == 1 for u in lone)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    assert cli.main(["rm", "--config", TINY, f"run.output_dir={out}"]) == 0
    return out / "tiny" / "rm"


def test_cli_rm_reports_held_out_metrics_and_stores_stats(trained_rm):
    meta = json.loads((trained_rm / "final" / "alignkit.json").read_text())
    assert meta["kind"] == "reward_model" and meta["input"] == {"layout": "chat", "max_length": 256}
    rows = read_metrics(trained_rm)
    assert rows[-1]["eval_pairs"] == 24 and 0 <= rows[-1]["eval_accuracy"] <= 1
    assert rows[-1]["eval_accuracy"] == meta["eval_accuracy"]
    assert "centering" in rows[0]  # centering_coef is on in the tiny config

    # The stored statistics are those of the held-out responses' scores.
    cfg = load_config(rm.Config, TINY)
    _, held = rm.load_pairs(cfg)
    fn = build_reward(f"rm:{trained_rm}")
    texts = {}
    for p in held:
        texts[(p.prompt[0]["content"], p.chosen)] = p
        texts[(p.prompt[0]["content"], p.rejected)] = p
    scores = fn([texts[k].prompt for k in texts], [k[1] for k in texts])
    assert meta["norm_samples"] == len(texts)
    assert meta["mean"] == pytest.approx(scores.mean(), abs=1e-5)
    assert meta["std"] == pytest.approx(scores.std(), abs=1e-5)
    c = fn([p.prompt for p in held], [p.chosen for p in held])
    r = fn([p.prompt for p in held], [p.rejected for p in held])
    assert meta["eval_accuracy"] == pytest.approx(float(np.mean(c > r)))
    assert meta["eval_margin"] == pytest.approx(float(np.mean(c - r)), abs=1e-5)


def test_saved_rm_matches_transformers_and_pipeline(trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    final = trained_rm / "final"
    fn = build_reward(f"rm:{trained_rm}")  # a run folder resolves to its final/
    ours = fn(PROMPTS, RESPONSES)
    assert len(set(np.round(ours, 6))) == len(RESPONSES)

    pipe = pipeline("text-classification", model=str(final), function_to_apply="none")
    theirs = [out["score"] for out in pipe([fn.input.pipeline_input(p, r) for p, r in zip(PROMPTS, RESPONSES)])]
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5)

    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        batch = tok([fn.input.pipeline_input(p, r) for p, r in zip(PROMPTS, RESPONSES)], padding=True,
                    return_tensors="pt")
        plain = model(**batch).logits[:, 0]
    assert plain.tolist() == pytest.approx(ours.tolist(), abs=1e-5)

    normed = build_reward({"rm": {"path": str(final), "normalize": True}})(PROMPTS, RESPONSES)
    assert normed == pytest.approx((ours - fn.mean) / fn.std)
    assert build_reward(f"rm:{final}?normalize=true")(PROMPTS, RESPONSES) == pytest.approx(normed)
    # Combined with itself (weight 1), auto normalisation uses the stored statistics.
    weighted = build_reward({"weighted": [{"reward": f"rm:{final}", "weight": 2.0}]})
    assert weighted(PROMPTS, RESPONSES, kinds=["helpful"] * 4) == pytest.approx(normed)


def test_lora_rm_on_rankings_adapter_loads_with_peft(tmp_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from alignkit.models import load_sequence_scorer

    rc = cli.main(["rm", "--config", TINY, f"run.output_dir={tmp_path}", "data.path=synthetic:rankings?n=16&k=3",
                   "model.lora.enabled=true", "model.lora.r=4", "use_margin=true", "train.batch_size=2",
                   "train.max_steps=3", "train.save_every=0"])
    assert rc == 0
    final = tmp_path / "tiny" / "rm" / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    assert read_metrics(final.parent)[0]["pairs"] == 2 * 3  # two rankings of C(3,2) pairs per step

    fn = build_reward(f"rm:{final}")
    ours = torch.tensor(fn(PROMPTS, RESPONSES))
    base = load_sequence_scorer(ModelConfig(name="tiny:llama"), trainable=False, tokenizer=tiny_tokenizer)
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    batch = fn.input.collate([fn.input.encode(p, r) for p, r in zip(PROMPTS, RESPONSES)])
    with torch.no_grad():
        assert torch.allclose(adapted(**batch).logits[:, 0].double(), ours, atol=1e-5)
        assert torch.allclose(merged(**batch).logits[:, 0].double(), ours, atol=1e-5)


def test_encoder_pair_layout_round_trips_through_pipeline(tmp_path):
    from transformers import pipeline

    from alignkit.models import load_sequence_scorer, load_tokenizer, save_model

    cfg = ModelConfig(name="builtin:minilm-l6")
    tok = load_tokenizer(cfg.name, padding_side="right")
    rm_input = RMInput(tok, "auto", 128)
    assert rm_input.layout == "pair"
    enc = rm_input.encode(PROMPTS[0], RESPONSES[0])
    assert enc["token_type_ids"].count(1) == len(tok(RESPONSES[0])["input_ids"]) - 1  # response + final [SEP]
    model = load_sequence_scorer(cfg, trainable=False, tokenizer=tok)
    save_model(model, tok, tmp_path, extra={"kind": "reward_model", "input": rm_input.describe(), "mean": 0.0,
                                            "std": 1.0})
    fn = build_reward(f"rm:{tmp_path}")
    ours = fn(PROMPTS, RESPONSES)
    pipe = pipeline("text-classification", model=str(tmp_path), function_to_apply="none")
    theirs = [o["score"] for o in pipe([fn.input.pipeline_input(p, r) for p, r in zip(PROMPTS, RESPONSES)])]
    assert theirs == pytest.approx(ours.tolist(), abs=1e-5)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    rc = cli.main(["rm", "--config", TINY, f"run.output_dir={tmp_path}", f"data.path={DATA / 'preferences.jsonl'}",
                   "data.max_length=8", "data.eval_fraction=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "preferences.jsonl:line 1: field 'chosen'" in err and "data.max_length=8" in err
    with pytest.raises(AlignkitError, match="not a reward-model folder"):
        build_reward(f"rm:{tmp_path}")
    with pytest.raises(AlignkitError, match="unknown option"):
        build_reward(f"rm:{tmp_path}?normalise=true")


def test_a_decoder_scorer_builds_no_kv_cache_in_its_forwards(tiny_tokenizer):
    # A reward model reads whole sequences once; transformers' decoders build a KV cache in
    # every forward unless told not to (memory and copies per layer for nothing).
    from alignkit.config import ModelConfig
    from alignkit.models import load_sequence_scorer

    model = load_sequence_scorer(ModelConfig(name="tiny:llama"), tokenizer=tiny_tokenizer)
    assert model.config.use_cache is False
    out = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert getattr(out, "past_key_values", None) is None


def test_texts_run_the_start_they_share_with_their_partners_once(tiny_tokenizer, monkeypatch, forward_tokens):
    # A ranking of 3 answers (3 pairs over 3 texts) and a pair to another prompt. A causal scorer runs
    # each prompt's tokens once and every text's own tokens after them; scores and gradients are those
    # of every text run whole, and the saving is the shared start, once per extra text.
    import os

    from alignkit.config import ModelConfig
    from alignkit.models import load_sequence_scorer

    prompt = [{"role": "user", "content": "Describe the sea in a few words, please."}]
    texts = ("The sea is vast and blue.", "Salty, deep and full of life.", "The sea is stupid.")
    item = RankingItem(prompt, texts, (LabelerRanking("ann", (2, 1, 3)),), "r.jsonl:line 1")
    pairs = ranking_to_pairs(item, group=0) + [
        PreferencePair([{"role": "user", "content": "Hi"}], "Hello there, friend!", "Go away.", loc="p.jsonl:line 1")]
    rm_input = RMInput(tiny_tokenizer, "chat", 256)
    data = rm.encode_pairs(rm_input, pairs, "raise")
    assert len(data.texts) == 5
    model = load_sequence_scorer(ModelConfig(name="tiny:llama", seed=2), tokenizer=tiny_tokenizer)
    tokens = forward_tokens(model)
    results = {}
    for share in (True, False):
        monkeypatch.setattr(rm, "can_share_prefixes", lambda m: share)
        model.zero_grad()
        tokens.clear()
        r_c, r_r = rm.score_pairs(model, rm_input, data, [0, 1, 2, 3])
        (r_c.sum() - 3 * r_r.sum()).backward()
        results[share] = (r_c, r_r, model.score.weight.grad.clone(), sum(tokens))
    (c, r, grad, run), (c_whole, r_whole, grad_whole, run_whole) = results[True], results[False]
    torch.testing.assert_close(c, c_whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, r_whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_whole, atol=1e-5, rtol=1e-5)
    ids = [t["input_ids"] for t in data.texts]
    assert run_whole == sum(map(len, ids))
    ranking, pair = ids[:3], ids[3:]
    # each group's start: what its texts have in common (the chat template and the prompt)
    saved = 2 * len(os.path.commonprefix(ranking)) + len(os.path.commonprefix(pair))
    assert len(os.path.commonprefix(ranking)) > 10 and run == run_whole - saved
    # an encoder (MiniLM is a BERT) cannot: its bidirectional prompt states read the answer
    from transformers import BertConfig, BertForSequenceClassification

    from alignkit.shared_prefix import can_share_prefixes

    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=1))
    assert can_share_prefixes(model) and not can_share_prefixes(bert)
