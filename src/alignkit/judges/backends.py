"""Where a judge's answers come from: a local transformers model or a chat endpoint.

A backend has an ``id`` (part of every cache key: two judges with different
models never share verdicts), a ``calls`` counter (conversations actually sent
to a model; the cache tests count it), and:

- ``complete(conversations, gen, seed) -> list[str]``: one answer per conversation;
- ``option_logprobs(conversations, options, prefix) -> list[list[float]]``: the
  log-probability of each option string as the start of the answer (local only).

The local backend samples through :func:`alignkit.rollout.generate`, the one
place that generates. The endpoint backend speaks the OpenAI chat-completions
protocol (``POST {base_url}/chat/completions``) over httpx: OpenAI itself, vLLM,
llama.cpp, Ollama, or ``alignkit serve``.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from alignkit.config import GenerationConfig, ModelConfig
from alignkit.errors import AlignkitError

Messages = list[dict]


def model_fingerprint(cfg: ModelConfig) -> str:
    """A model's identity for cache keys: its name, plus file sizes/times for a local folder.

    A folder that is retrained in place (``runs/x/sft/final``) gets a new
    fingerprint, so stale verdicts from the old weights are never reused.
    """
    parts = [cfg.name, cfg.dtype]
    if cfg.name.startswith("tiny:"):
        parts.append(f"seed={cfg.seed}")
    folder = Path(cfg.name)
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    if cfg.lora.enabled:
        parts.append("lora")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class LocalBackend:
    """A causal LM loaded by alignkit (hub id, folder, builtin:..., tiny:...), run in-process."""

    def __init__(self, cfg: ModelConfig | None = None, *, model=None, tokenizer=None, batch_size: int = 8,
                 device=None):
        if cfg is None and model is None:
            raise ValueError("LocalBackend needs a ModelConfig or a loaded model + tokenizer")
        self.cfg = cfg or ModelConfig(name=getattr(model, "name_or_path", "in-memory"))
        self._model, self._tok = model, tokenizer
        self.batch_size = batch_size
        self.device = device  # where a model loaded here goes (a given model stays where it is)
        self.calls = 0
        self.id = f"local:{self.cfg.name}:{model_fingerprint(self.cfg)}"
        if cfg is None:  # weights of unknown origin: never share cached verdicts with another process
            self.id += f":{id(model)}"

    def _load(self):
        if self._model is None:
            from alignkit.models import load_causal_lm, load_tokenizer

            self._tok = load_tokenizer(self.cfg.name, self.cfg.cache_dir)
            self._model = load_causal_lm(self.cfg, trainable=False, tokenizer=self._tok)
            if self.device is not None:
                self._model.to(self.device)
        return self._model, self._tok

    def complete(self, conversations: list[Messages], gen: GenerationConfig, seed: int = 0) -> list[str]:
        from alignkit.rollout import generate

        if not conversations:
            return []
        model, tok = self._load()
        self.calls += len(conversations)
        return [g.text for g in generate(model, tok, conversations, gen, n=1, seed=seed)]

    @torch.no_grad()
    def option_logprobs(self, conversations: list[Messages], options: tuple[str, ...],
                        prefix: str = "") -> list[list[float]]:
        """log P(option | conversation, answer prefix) for each option: one forward pass per batch.

        The option is tokenised on its own after the prompt (as collate does for
        responses), so the boundary is exact. Different options are disjoint
        continuations, so their probabilities sum to at most 1.
        """
        from alignkit.data.collate import encode_prompt, pad
        from alignkit.losses import sequence_logprobs, token_logprobs

        if not conversations:
            return []
        model, tok = self._load()
        self.calls += len(conversations)
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
        rows, masks = [], []
        for conv in conversations:
            p = encode_prompt(tok, conv) + prefix_ids
            for o in option_ids:
                rows.append(p + o)
                masks.append([0] * len(p) + [1] * len(o))
        device = next(model.parameters()).device
        out: list[float] = []
        step = self.batch_size * len(options)
        for start in range(0, len(rows), step):
            ids = pad(rows[start:start + step], tok.pad_token_id).to(device)
            attn = pad([[1] * len(r) for r in rows[start:start + step]], 0).to(device)
            mask = pad(masks[start:start + step], 0).bool().to(device)
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            lp = token_logprobs(logits[:, :-1], ids[:, 1:])
            out += sequence_logprobs(lp, mask[:, 1:]).tolist()
        k = len(options)
        return [out[i * k:(i + 1) * k] for i in range(len(conversations))]


class EndpointBackend:
    """Any OpenAI-compatible ``/chat/completions`` endpoint.

    The key is read from the environment variable ``api_key_env`` when the call
    is made (never stored in configs or run folders); a missing key is fine for
    local servers, which need none.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 concurrency: int = 4, client=None):
        if not base_url.startswith(("http://", "https://")):
            raise AlignkitError(f"judge base_url '{base_url}' must start with http:// or https://")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self._client = client
        self.calls = 0
        self.id = f"openai:{base_url.rstrip('/')}:{model}"

    def _headers(self) -> dict:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _one(self, client, conv: Messages, gen: GenerationConfig, seed: int) -> str:
        import httpx

        body = {"model": self.model, "messages": conv, "max_tokens": gen.max_new_tokens, "n": 1, "seed": seed,
                "temperature": gen.temperature if gen.do_sample else 0.0}
        if gen.do_sample and gen.top_p < 1:
            body["top_p"] = gen.top_p
        try:
            resp = client.post(self.url, json=body, headers=self._headers(), timeout=self.timeout)
        except httpx.HTTPError as e:
            raise AlignkitError(f"judge endpoint {self.url}: {type(e).__name__}: {e}") from None
        if resp.status_code != 200:
            raise AlignkitError(f"judge endpoint {self.url}: HTTP {resp.status_code}: {_error_text(resp)}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise AlignkitError(f"judge endpoint {self.url}: the reply is not a chat completion: "
                                f"{resp.text[:200]!r}") from None
        return content or ""

    def complete(self, conversations: list[Messages], gen: GenerationConfig, seed: int = 0) -> list[str]:
        import httpx

        if not conversations:
            return []
        client = self._client or httpx.Client()
        try:
            self.calls += len(conversations)
            if self.concurrency == 1 or len(conversations) == 1:
                return [self._one(client, c, gen, seed) for c in conversations]
            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(lambda c: self._one(client, c, gen, seed), conversations))
        finally:
            if self._client is None:
                client.close()

    def option_logprobs(self, conversations, options, prefix=""):
        raise AlignkitError("the log-probability judge mode needs backend: local (a chat-completions "
                            "endpoint does not return the probability of a given answer); use mode: generate")


def _error_text(resp) -> str:
    try:
        data = resp.json()
        err = data.get("error", data)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return resp.text[:300]
