"""Sampling and the PPO rollout: the inverse-CDF sampler, recorded log-probs, layout, log-probs at the
sampling temperature, EOS handling, full-softmax sampling."""

import dataclasses

import pytest
import torch

from alignkit.config import GenerationConfig, ModelConfig
from alignkit.data.collate import encode_prompt
from alignkit.models import load_causal_lm, load_sequence_scorer, load_tokenizer
from alignkit.actor_critic import ActorCritic, reference_forward
from alignkit.rollout import decode, draw, generate, layout, ppo_rollout

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a long story about a brave little fox and the lazy dog."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:llama", padding_side="left")


def _actor_critic(tok, seed=0):
    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=seed), rl=True, tokenizer=tok)
    ac = ActorCritic(policy)
    with torch.no_grad():  # a non-zero head, so that misaligned values would show
        ac.value_head.weight.normal_(0, 0.5)
    return ac


def test_layout_left_pads_prompts_and_right_pads_responses():
    pad = 0
    # the second response samples the pad id as an ordinary token: it must stay valid
    ids, attn, pos, resp, mask, P = layout([[5, 6], [7]], [[8, 2], [0, 9, 10]], pad)
    assert P == 2
    assert ids.tolist() == [[5, 6, 8, 2, 0], [0, 7, 0, 9, 10]]
    assert attn.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 3, 3], [0, 0, 1, 2, 3]]
    assert resp.tolist() == [[8, 2, 0], [0, 9, 10]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_rollout_logprobs_and_values_match_each_sequence_scored_alone(tok):
    torch.manual_seed(0)
    ac = _actor_critic(tok)
    gen = GenerationConfig(max_new_tokens=7, temperature=0.7, batch_size=4)
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    ro = ppo_rollout(ac, tok, prompt_ids, gen, reference=reference_forward(ac.policy), n=2, forward_batch_size=4)
    assert len(ro) == 6 and ro.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert ro.context_length == max(len(p) for p in prompt_ids)
    for i in range(len(ro)):
        n = int(ro.mask[i].sum())
        response = ro.responses[i, :n]
        seq = torch.tensor(prompt_ids[ro.prompt_index[i]] + response.tolist())[None]
        with torch.no_grad():  # no padding, default positions: the ground truth
            out = ac.policy(input_ids=seq, output_hidden_states=True)
        start = len(prompt_ids[ro.prompt_index[i]]) - 1
        logits = out.logits[0, start:start + n]
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, response[:, None]).squeeze(-1)
        torch.testing.assert_close(ro.logprobs[i, :n], expected, atol=1e-5, rtol=0)
        at_t1 = torch.log_softmax(logits, -1).gather(-1, response[:, None]).squeeze(-1)
        assert not torch.allclose(ro.logprobs[i, :n], at_t1, atol=1e-3)  # the temperature is applied
        values = ac.value_head(out.hidden_states[-1][0, start:start + n]).squeeze(-1)
        torch.testing.assert_close(ro.values[i, :n], values, atol=1e-5, rtol=0)
        # padding holds zeros, never stray numbers that a statistic could pick up
        assert (ro.logprobs[i, n:] == 0).all() and (ro.values[i, n:] == 0).all()
    # full fine-tuning: the reference is a frozen copy, identical before any update; its log-probs come
    # from a forward, the policy's from the sampler's cached steps: equal to float rounding
    torch.testing.assert_close(ro.logprobs, ro.ref_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_the_sampler_scores_the_rollout_as_a_forward_would_without_one(tok, monkeypatch, critic):
    # With the policy sampling in float32, the rollout's log-probs (and a value head's values) are
    # read while sampling: no forward of the policy over the sampled sequences; a separate value
    # model runs alone. They must be what the policy's forward gives, on rows that share a prompt's
    # prefill and on rows that end early and leave the batch.
    import alignkit.rollout as rollout_module

    torch.manual_seed(1)
    ac = _actor_critic(tok)
    if critic == "separate":
        value_model = load_sequence_scorer(ModelConfig(name="tiny:llama", seed=4), tokenizer=tok)
        with torch.no_grad():
            value_model.score.weight.normal_(0, 0.5)
        ac = ActorCritic(ac.policy, value_model)
    eos = tok.eos_token_id
    ac.policy.lm_head.register_forward_hook(lambda m, i, out: out + 5.0 * (torch.arange(out.shape[-1]) == eos))
    gen = GenerationConfig(max_new_tokens=8, temperature=0.7, batch_size=8)
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    reference = reference_forward(ac.policy)  # full fine-tuning: a frozen copy, not the policy
    whole_forwards = []
    ac.policy.register_forward_pre_hook(lambda m, a, kw: whole_forwards.append(kw["use_cache"]), with_kwargs=True)
    fast = ppo_rollout(ac, tok, prompt_ids, gen, reference=reference, n=4, forward_batch_size=4, seed=5)
    assert whole_forwards and not any(use is False for use in whole_forwards)  # only cached decoding steps
    monkeypatch.setattr(rollout_module, "scores_while_sampling", lambda *args: False)
    whole_forwards.clear()
    scored = ppo_rollout(ac, tok, prompt_ids, gen, reference=reference, n=4, forward_batch_size=4, seed=5)
    assert whole_forwards.count(False) == 3  # 12 rows in forwards of 4
    lengths = fast.lengths.tolist()
    assert min(lengths) < max(lengths)  # rows left the batch while others ran on
    assert torch.equal(fast.responses, scored.responses) and torch.equal(fast.mask, scored.mask)
    for field in ("logprobs", "values", "ref_logprobs"):
        torch.testing.assert_close(getattr(fast, field), getattr(scored, field), atol=1e-5, rtol=0)
    assert fast.values.abs().max() > 0.1  # a non-zero head: misplaced values would show
    assert (fast.values[~fast.mask] == 0).all() and (fast.logprobs[~fast.mask] == 0).all()
    # a static cache (compiled decoding steps on a GPU) keeps the policy's scoring forward
    monkeypatch.undo()
    whole_forwards.clear()
    static = dataclasses.replace(gen, cache="static")
    ppo_rollout(ac, tok, prompt_ids, static, reference=reference, n=4, forward_batch_size=4, seed=5)
    assert whole_forwards.count(False) == 3
    with pytest.raises(ValueError, match="static cache"):
        ids = torch.tensor([prompt_ids[0]])
        decode(ac.policy, ids, torch.ones_like(ids), static, eos,
               value_head=torch.nn.Linear(ac.policy.config.hidden_size, 1))


def test_finished_responses_keep_eos_as_an_action(tok):
    torch.manual_seed(1)
    ac = _actor_critic(tok)
    eos = tok.eos_token_id
    # Make EOS likely (about 1 in 8 per token) so that some responses finish and some do not.
    ac.policy.lm_head.register_forward_hook(lambda m, i, out: out + 5.0 * (torch.arange(out.shape[-1]) == eos))
    gen = GenerationConfig(max_new_tokens=6, batch_size=16)
    ro = ppo_rollout(ac, tok, [encode_prompt(tok, PROMPTS[0])], gen, reference=reference_forward(ac.policy), n=24,
                     forward_batch_size=8)
    finished = ro.finished.tolist()
    assert any(finished) and not all(finished)
    for i, done in enumerate(finished):
        n = int(ro.mask[i].sum())
        if done:
            assert ro.responses[i, n - 1] == eos  # EOS is the last valid token...
            assert ro.logprobs[i, n - 1] < 0  # ...and scored like any other action
            assert eos not in ro.responses[i, :n - 1].tolist()
        else:
            assert n == gen.max_new_tokens and eos not in ro.responses[i, :n].tolist()


def test_sampling_draws_from_the_full_softmax(tok):
    # transformers falls back to top_k=50 when top_k is unset; PPO's log-probs are
    # those of the full softmax, so the sampler must not truncate. The tiny random
    # model is close to uniform over 1,024 tokens: 300 draws give far more than 50
    # distinct first tokens, and at most 50 under a top-50 truncation.
    torch.manual_seed(2)
    ac = _actor_critic(tok)
    gen = GenerationConfig(max_new_tokens=1, batch_size=300)
    ro = ppo_rollout(ac, tok, [encode_prompt(tok, PROMPTS[2])], gen, reference=reference_forward(ac.policy), n=300,
                     forward_batch_size=300)
    assert len(set(ro.responses[:, 0].tolist())) > 120


def test_rollout_is_reproducible_from_the_seed(tok):
    ac = _actor_critic(tok)
    gen = GenerationConfig(max_new_tokens=5, batch_size=8)
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(ppo_rollout(ac, tok, prompt_ids, gen, reference=reference_forward(ac.policy), forward_batch_size=2))
    assert torch.equal(runs[0].responses, runs[1].responses) and runs[0].texts == runs[1].texts
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)


def test_draw_samples_the_tempered_softmax():
    # logits [2, 1, 0, -1, -inf] at T = 0.5 -> [4, 2, 0, -2, -inf]; e^4 = 54.598, e^2 = 7.389,
    # e^0 = 1, e^-2 = 0.135, sum 63.122 -> p = [0.8650, 0.1171, 0.0158, 0.0021, 0]
    expected = torch.tensor([54.598, 7.389, 1.0, 0.135, 0.0]) / 63.122
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")]).repeat(40_000, 1)
    torch.manual_seed(0)
    drawn, recorded = draw(logits, temperature=0.5)
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    assert freq[4] == 0  # probability 0 is never drawn
    # 40,000 draws: the standard error of p = 0.865 is 0.0017, of p = 0.0021 it is 0.00023
    torch.testing.assert_close(freq, expected.double(), atol=0.007, rtol=0)
    assert abs(freq[3] - 0.0021) < 0.0012
    # the recorded log-prob is the drawn token's under the tempered softmax
    assert recorded.shape == (40_000,)
    torch.testing.assert_close(recorded.exp(), expected[drawn], atol=1e-4, rtol=0)
    # a given uniform picks the first token whose cumulative probability exceeds it:
    # cdf = [0.8650, 0.9821, 0.9979, 1.0, 1.0]
    u = torch.tensor([0.0, 0.8649, 0.8651, 0.99, 0.9999])
    tokens, _ = draw(logits[:5], 0.5, u)
    assert tokens.tolist() == [0, 0, 1, 2, 3]
    # bf16 logits are drawn from and scored in float32
    _, lp16 = draw(logits[:5].bfloat16(), 0.5, u)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16.exp(), expected[tokens], atol=1e-4, rtol=0)


def test_generate_records_each_drawn_tokens_logprob(tok):
    # The log-probs the sampler records during cached, left-padded generation are the ones a
    # plain forward over prompt + response gives at the sampling temperature.
    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), trainable=False, tokenizer=tok)
    gen = GenerationConfig(max_new_tokens=6, temperature=0.7, batch_size=4)
    out = generate(policy, tok, PROMPTS, gen, n=2, seed=5)
    assert len(out) == 6
    for g in out:
        assert len(g.logprobs) == len(g.response_ids) > 0
        seq = torch.tensor([list(g.prompt_ids) + list(g.response_ids)])
        with torch.no_grad():
            logits = policy(input_ids=seq).logits[0, len(g.prompt_ids) - 1:-1]
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(g.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)
    # the same seed draws the same tokens
    again = generate(policy, tok, PROMPTS, gen, n=2, seed=5)
    assert [g.response_ids for g in again] == [g.response_ids for g in out]
    # top-k truncation is transformers' sampler: no full-softmax log-probs to record
    truncated = generate(policy, tok, PROMPTS[:1], GenerationConfig(max_new_tokens=3, top_k=5), seed=5)
    assert truncated[0].logprobs is None


def test_rows_that_end_leave_the_batch_and_the_others_sample_the_same(tok):
    # The decoding loop drops a row from the batch (and from the dynamic KV cache) once it has
    # emitted EOS. The rows left must go on exactly as they would have in the full batch: the
    # same tokens and log-probs as a static cache (no dropping) and as every_step (the whole
    # batch to the last step, as sharded weights need).
    from alignkit.rollout import decode, row_uniforms

    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), trainable=False, tokenizer=tok).eval()
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    attn = (ids != 0).long()
    u = row_uniforms(4, [(0, i) for i in range(3)], 10)
    free, _, _ = decode(policy, ids, attn, GenerationConfig(max_new_tokens=10), None, u)
    eos = free[1, 2].item()  # row 1 ends at its third token
    assert eos not in free[0, :9].tolist() + free[2, :9].tolist()  # the others run on
    batch_sizes = []
    policy.register_forward_pre_hook(lambda m, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                     with_kwargs=True)
    runs = {}
    for name, cache, every in (("dynamic", "dynamic", False), ("static", "static", False),
                               ("every step", "dynamic", True)):
        batch_sizes.clear()
        runs[name] = decode(policy, ids, attn, GenerationConfig(max_new_tokens=10, cache=cache), eos, u,
                            every_step=every)
        runs[name + " sizes"] = list(batch_sizes)
    assert runs["dynamic sizes"] == [3, 3, 3] + [2] * 7  # row 1 left after its EOS at step 3
    assert runs["static sizes"] == runs["every step sizes"] == [3] * 10
    for name in ("static", "every step"):
        tokens, logprobs, _ = runs[name]
        for row, n in ((0, 10), (1, 3), (2, 10)):  # up to and including each row's end
            assert torch.equal(tokens[row, :n], runs["dynamic"][0][row, :n]), name
            torch.testing.assert_close(logprobs[row, :n], runs["dynamic"][1][row, :n], atol=1e-5, rtol=0)
    # and before any row ended, the tokens are those sampled without an EOS at all
    assert torch.equal(runs["dynamic"][0][:, :3], free[:, :3])


def test_a_half_precision_sampler_follows_the_policy_and_reports_its_gap(tok):
    from alignkit.rollout import sampler_mismatch, sampler_model

    ac = _actor_critic(tok)
    prompt_ids = [encode_prompt(tok, p) for p in PROMPTS]
    ref = reference_forward(ac.policy)
    gaps = {}
    for dtype in ("auto", "bfloat16"):
        gen = GenerationConfig(max_new_tokens=6, batch_size=8, dtype=dtype)
        ro = ppo_rollout(ac, tok, prompt_ids, gen, reference=ref, n=2, forward_batch_size=6, seed=3)
        gaps[dtype] = sampler_mismatch(ro)
        # the trainer's log-probs are always the policy's own, in its precision
        assert ro.logprobs.dtype == torch.float32 and ro.sampler_logprobs.shape == ro.logprobs.shape
    # the same precision: the sampler's log-probs are the trainer's to float rounding
    assert gaps["auto"]["sampler/logprob_gap"] < 1e-5 and abs(gaps["auto"]["sampler/kl"]) < 1e-6
    # bfloat16 keeps 8 bits of mantissa: the gap shows, and stays small
    assert 1e-4 < gaps["bfloat16"]["sampler/logprob_gap"] < 0.2
    assert 0 <= gaps["bfloat16"]["sampler/kl"] < 0.05  # k3 = r - 1 - log r >= 0 per token
    gen = GenerationConfig(max_new_tokens=6, batch_size=8, dtype="bfloat16")
    twin = sampler_model(ac.policy, gen)
    assert twin is not ac.policy and twin is sampler_model(ac.policy, gen)  # made once
    assert next(twin.parameters()).dtype == torch.bfloat16 and next(ac.policy.parameters()).dtype == torch.float32
    # the copy follows the policy's current weights: with the output layer at zero every token
    # has probability 1/1024, so the sampler's log-probs are all -log(1024) = -6.9315
    with torch.no_grad():
        ac.policy.get_output_embeddings().weight.zero_()
    ro = ppo_rollout(ac, tok, prompt_ids, gen, reference=ref, forward_batch_size=6, seed=3)
    torch.testing.assert_close(ro.sampler_logprobs[ro.mask], torch.full((int(ro.mask.sum()),), -6.9315),
                               atol=1e-4, rtol=0)


def test_a_lora_policys_sampler_copy_is_merged_and_follows_the_adapter(tok):
    from peft import PeftModel

    from alignkit.config import LoraConfig
    from alignkit.rollout import sampler_model

    policy = load_causal_lm(ModelConfig(name="tiny:llama", lora=LoraConfig(enabled=True, r=4)), tokenizer=tok)
    policy.eval()
    gen = GenerationConfig(dtype="bfloat16")
    ids = torch.tensor([encode_prompt(tok, PROMPTS[1])])
    for trial in range(2):
        with torch.no_grad():  # a trained adapter: B != 0, different at each sync
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
            before = None if trial == 0 else expected
            expected = policy(input_ids=ids).logits
            twin = sampler_model(policy, gen)
            got = twin(input_ids=ids).logits.float()
        assert not isinstance(twin, PeftModel) and next(twin.parameters()).dtype == torch.bfloat16

        def kl(p_logits, q_logits):  # per position, KL(p || q) in nats
            p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
            return (p.exp() * (p - q)).sum(-1).max().item()

        assert kl(expected, got) < 0.01  # bf16 rounding of W + B A s (measured 1e-4 to 4e-3)
        if before is not None:  # the adapter moved the distribution; the copy moved with it
            assert kl(expected, before) > 5 * kl(expected, got)


@pytest.mark.parametrize("do_sample", [True, False])
def test_a_model_whose_distribution_is_not_finite_stops_sampling_with_the_rows_named(tok, do_sample):
    # NaN weights (a diverged update) make every logit NaN: a token "drawn" from them is noise (the
    # inverse CDF of a NaN cumulative sum picks the last id; argmax picks the NaN's position), and a
    # run that trained on it would report success. The loop stops at the first new token instead.
    from alignkit.errors import NonFiniteError
    from alignkit.rollout import decode

    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), trainable=False, tokenizer=tok).eval()
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    gen = GenerationConfig(max_new_tokens=4, do_sample=do_sample)
    tokens, _, _ = decode(policy, ids, (ids != 0).long(), gen, None)  # finite: four tokens per row
    assert tokens.shape == (2, 4)
    with torch.no_grad():
        policy.lm_head.weight[7].fill_(float("nan"))  # logit 7 of every row is NaN (and token 7's embedding)
    with pytest.raises(NonFiniteError, match=r"not finite at new token 1 of row\(s\) \[0, 1\]"):
        decode(policy, ids, (ids != 0).long(), gen, None)


def test_a_static_cache_rounds_the_prompt_width_up_so_that_rollouts_share_shapes(tok):
    # The compiled step (CUDA) compiles once per shape. Prompts of 4 and of 6 columns both run on
    # STATIC_BUCKET = 64 prompt columns (the extra ones left padding, masked), and the tokens and
    # log-probs are those of the unpadded prompt.
    from alignkit.rollout import STATIC_BUCKET, decode, row_uniforms

    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), trainable=False, tokenizer=tok).eval()
    widths = []
    policy.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["attention_mask"].shape[1]),
                                     with_kwargs=True)
    narrow = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    wide = torch.cat([torch.zeros(2, 2, dtype=torch.long), narrow], 1)  # the same prompts, 2 more pad columns
    u = row_uniforms(4, [(0, i) for i in range(2)], 5)
    runs = [decode(policy, ids, (ids != 0).long(), GenerationConfig(max_new_tokens=5, cache="static"), None, u)
            for ids in (narrow, wide)]
    assert widths == [STATIC_BUCKET + 5] * 10  # 5 steps per call, every one on the full static width
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-5, rtol=0)
    dynamic = decode(policy, narrow, (narrow != 0).long(), GenerationConfig(max_new_tokens=5), None, u)
    assert torch.equal(dynamic[0], runs[0][0])


def test_rows_that_repeat_a_prompt_share_one_prefill_and_sample_as_if_alone(tok):
    # GRPO samples each prompt G times: the prompt's prefill runs once and its cache rows are
    # copied. Each row still draws its own tokens from its own uniforms, exactly as alone.
    from alignkit.rollout import decode, row_uniforms

    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), trainable=False, tokenizer=tok).eval()
    a, b = [0, 5, 6, 7], [9, 10, 11, 12]
    ids = torch.tensor([a, b, a, a])
    u = row_uniforms(4, [(0, i) for i in range(4)], 6)
    sizes = []
    policy.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape), with_kwargs=True)
    tokens, logprobs, _ = decode(policy, ids, (ids != 0).long(), GenerationConfig(max_new_tokens=6), None, u)
    assert sizes[0] == (2, 4) and sizes[1:] == [(4, 1)] * 5  # one prefill row per distinct prompt
    assert len({tuple(r) for r in tokens[[0, 2, 3]].tolist()}) > 1  # the same prompt, different draws
    for i in range(4):
        alone = decode(policy, ids[i:i + 1], (ids[i:i + 1] != 0).long(), GenerationConfig(max_new_tokens=6), None,
                       u[i:i + 1])
        assert torch.equal(alone[0][0], tokens[i])
        torch.testing.assert_close(alone[1][0], logprobs[i], atol=1e-5, rtol=0)


def test_the_decoding_loop_passes_the_cache_by_the_name_the_models_forward_takes(tok):
    # transformers renamed forward's past_key_values to cache. A model whose forward still takes
    # past_key_values (an older transformers) must get its cache by that name: passed as cache=
    # it would vanish into **kwargs and each step would see one token without its context.
    from transformers import LlamaForCausalLM

    from alignkit.rollout import cache_kwarg, decode, row_uniforms

    class OlderForward(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, **kwargs):
            assert "cache" not in kwargs
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)

    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), trainable=False, tokenizer=tok).eval()
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    u = row_uniforms(4, [(0, i) for i in range(2)], 6)
    expected = decode(policy, ids, (ids != 0).long(), GenerationConfig(max_new_tokens=6), None, u)
    assert cache_kwarg(policy) == "cache"
    policy.__class__ = OlderForward
    assert cache_kwarg(policy) == "past_key_values"
    got = decode(policy, ids, (ids != 0).long(), GenerationConfig(max_new_tokens=6), None, u)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled static-cache step runs on CUDA only")
def test_the_compiled_static_cache_step_on_cuda_samples_as_the_dynamic_cache(tok):
    # On CUDA a static cache's decoding steps run compiled (CUDA graphs). In the same precision
    # they must draw the same tokens with the same recorded log-probs as the eager dynamic cache,
    # on the first call (recording) and the next (replaying), with rows of different lengths.
    from alignkit.rollout import decode, row_uniforms

    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=3), trainable=False, tokenizer=tok).cuda().eval()
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]], device="cuda")
    attn = (ids != 0).long()
    u = row_uniforms(4, [(0, i) for i in range(3)], 12)
    dynamic = decode(policy, ids, attn, GenerationConfig(max_new_tokens=12), None, u)
    for _ in range(2):
        static = decode(policy, ids, attn, GenerationConfig(max_new_tokens=12, cache="static"), None, u)
        assert torch.equal(static[0], dynamic[0])
        torch.testing.assert_close(static[1], dynamic[1], atol=1e-4, rtol=0)


def test_answers_to_one_prompt_run_it_once_with_the_log_probs_and_gradients_of_whole_rows(tok, forward_tokens):
    from alignkit.rollout import forward_responses, forward_shared_prompts, shares_prompts
    from alignkit.training import enable_gradient_checkpointing

    torch.manual_seed(0)
    policy = load_causal_lm(ModelConfig(name="tiny:llama", seed=0), rl=True, tokenizer=tok)
    ac = ActorCritic(policy, critic=False)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    # prompt 0 answered three times (one answer empty), prompt 1 twice; lengths differ, so rows pad
    responses = [[12, 13, 14], [], [15, 16, 17, 18, 19, 20], [21], [22, 23]]
    owner = [0, 0, 0, 1, 1]
    ids, attn, pos, resp, mask, P = layout([prompts[o] for o in owner], responses, 0)
    tokens = forward_tokens(policy)
    runs = {}
    for name, run in (("whole", lambda: forward_responses(ac, ids, attn, pos, resp, 0.7)),
                      ("shared", lambda: forward_shared_prompts(ac, ids, attn, pos, resp, 0.7))):
        tokens.clear()
        ac.zero_grad()
        logprobs, values, logits = run()
        (logprobs * mask).sum().backward()
        runs[name] = (torch.where(mask, logprobs, 0).detach(), values, logits.shape, sum(tokens),
                      {n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None})
    whole, shared = runs["whole"], runs["shared"]
    torch.testing.assert_close(shared[0], whole[0], atol=1e-5, rtol=0)
    assert shared[1] is None and shared[2] == whole[2] == (5, 6, 1024)  # the longest answer's 6 columns
    # the tokens each forward ran (non-padding): whole rows, or each prompt but its last token once,
    # then in each row that token (whose logits predict the answer's first) and the answer
    assert whole[3] == sum(len(prompts[o]) + len(r) for o, r in zip(owner, responses)) == 31
    assert shared[3] == (5 - 1) + (2 - 1) + sum(1 + len(r) for r in responses) == 22
    assert shared[4].keys() == whole[4].keys()
    for name, grad in whole[4].items():
        torch.testing.assert_close(shared[4][name], grad, atol=1e-5, rtol=1e-4)
    # the reference (adapter off or a frozen copy) takes the same route
    with torch.no_grad():
        ref = reference_forward(policy)
        torch.testing.assert_close(torch.where(mask, forward_shared_prompts(ref, ids, attn, pos, resp, 0.7)[0], 0),
                                   whole[0], atol=1e-5, rtol=0)
    # a prompt of one token leaves nothing to share: rows run whole
    one = layout([[5], [5]], [[6, 7], [8]], 0)
    tokens.clear()
    with torch.no_grad():
        torch.testing.assert_close(forward_shared_prompts(ac, *one[:4], 0.7)[0], forward_responses(ac, *one[:4], 0.7)[0])
    assert tokens == [5, 5]  # one call each, on the same 5 tokens
    # when it applies: several answers a prompt, a causal model keeping its cache, no critic on the trunk
    assert shares_prompts(policy, 4) and not shares_prompts(policy, 1)
    with pytest.raises(ValueError, match="critic-free"):
        ActorCritic(policy)(ids, attn, pos, 2, cache=object())
    enable_gradient_checkpointing(policy)
    assert not shares_prompts(policy, 4)
