"""The ``alignkit`` command: a thin table from subcommand to recipe.

Every stage is ``alignkit STAGE [--config FILE.yaml] [key.sub=value ...] [--resume]``.
A recipe module provides ``Config`` (a dataclass) and ``main(cfg, resume=False)``;
a module with its own arguments (``label``, ``serve``) provides ``cli(argv)`` instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from alignkit.errors import AlignkitError, NotBuiltError

STAGES: dict[str, tuple[str, str]] = {
    "sft": ("alignkit.recipes.sft", "supervised fine-tuning on demonstrations"),
    "rm": ("alignkit.recipes.rm", "train a reward model on preferences or rankings"),
    "ppo": ("alignkit.recipes.ppo", "PPO against a reward (RLHF / RLAIF)"),
    "dpo": ("alignkit.recipes.dpo", "DPO / IPO / SimPO / KTO on preference data"),
    "rl": ("alignkit.recipes.rl", "critic-free online RL: GRPO, RLOO, REINFORCE++, online DPO"),
    "best-of-n": ("alignkit.recipes.best_of_n", "rejection sampling: sample N, keep the best, fine-tune"),
    "label-ai": ("alignkit.recipes.label_ai", "AI feedback: rank K responses per prompt with a reward"),
    "cai": ("alignkit.recipes.cai", "Constitutional AI: critique/revise, then AI preference labels"),
    "label": ("alignkit.feedback.cli", "the human feedback web app (label serve | create-project | ...)"),
    "eval": ("alignkit.recipes.eval", "compare models on held-out prompts; HTML report"),
    "run": ("alignkit.recipes.pipeline", "run a pipeline of stages from one YAML file"),
    "demo": ("alignkit.recipes.demo", "the built-in pipeline on the built-in model, offline"),
    "chat": ("alignkit.recipes.chat", "chat with a model (one prompt, or interactive)"),
    "generate": ("alignkit.recipes.chat", "generate responses for a prompt file (optionally best-of-N)"),
    "serve": ("alignkit.recipes.serve", "an OpenAI-compatible chat-completions server for a model"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignkit", description="Align language models with human and AI feedback.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="stages:\n" + "\n".join(f"  {k:<10} {v[1]}" for k, v in STAGES.items())
                                + "\n\nalignkit STAGE --help shows a stage's options.")
    p.add_argument("stage", choices=list(STAGES), metavar="STAGE", help="one of: " + ", ".join(STAGES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="stage arguments")
    return p


def _stage_parser(stage: str, module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"alignkit {stage}", description=STAGES[stage][1])
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, kw in getattr(module, "EXTRA_ARGS", {}).items():
        p.add_argument(flag, **kw)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    return p


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    module_name = STAGES[args.stage][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise NotBuiltError(f"'alignkit {args.stage}' is not built yet") from None
        raise
    if hasattr(module, "cli"):
        return int(module.cli(args.args, stage=args.stage) or 0)
    from alignkit.config import dump_config, load_config

    sargs = _stage_parser(args.stage, module).parse_args(args.args)
    cfg = load_config(module.Config, sargs.config, sargs.overrides)
    if sargs.print_config:
        dump_config(cfg, "/dev/stdout")
        return 0
    names = [flag.lstrip("-").replace("-", "_") for flag in getattr(module, "EXTRA_ARGS", {})]
    extra = {name: getattr(sargs, name) for name in names}
    module.main(cfg, resume=sargs.resume, **extra)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = run(argv)
    except AlignkitError as e:
        print(f"{_process_prefix()}alignkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_process_prefix()}alignkit: interrupted", file=sys.stderr)
        return 130
    if _launched():
        # Finish together: no process leaves while another still sends it results.
        sys.modules["torch"].distributed.barrier()
    return code


def entry() -> None:
    """The ``alignkit`` console script and ``python -m alignkit``: :func:`main`, then exit.

    Under a launch (torchrun, accelerate launch) the process ends with ``os._exit``
    once its output is flushed, not through the interpreter's teardown: there the
    process group's C++ threads are destroyed while the peer process may still be
    closing its side, and torch 2.13 with gloo sometimes aborts at that point
    ("terminate called without an active exception", SIGABRT), which turns a
    finished run into a failed launch. Everything the run writes is closed by then
    (run folders, logs, checkpoints), so nothing is lost by skipping the teardown.
    """
    _plain_warnings()
    code = main()
    if _launched():
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _plain_warnings() -> None:
    """alignkit's own warnings (skipped records, a setting that runs but not as its value suggests)
    as one line, ``alignkit: warning: ...``, like its errors, rather than Python's two lines that
    quote the source file."""
    import warnings

    from alignkit.data.io import DataWarning
    from alignkit.errors import ConfigWarning

    python_format = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DataWarning, ConfigWarning)):
            print(f"{_process_prefix()}alignkit: warning: {message}", file=file or sys.stderr)
        else:
            python_format(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _launched() -> bool:
    """True in a process of a launch whose process group is up."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized())


def _process_prefix() -> str:
    """``[process N] `` in the processes other than the main one of a launch, else nothing."""
    if _launched():
        rank = sys.modules["torch"].distributed.get_rank()
        return f"[process {rank}] " if rank else ""
    return ""


if __name__ == "__main__":
    entry()
