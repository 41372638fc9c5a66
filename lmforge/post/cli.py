"""``lmforge post-data``, ``post-pairs``, ``sft``, ``dpo``, ``distill`` and ``chat``: thin wrappers over :mod:`lmforge.post`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lmforge.config import flag_tree
from lmforge.knowledge.augment import open_knowledge
from lmforge.model.generate import SampleConfig
from lmforge.post.chat import open_chat, reply
from lmforge.post.distill import DistillConfig, distill
from lmforge.post.dpo import DPOConfig, dpo, load_dpo_config
from lmforge.post.pairs import PairsConfig, build_pairs
from lmforge.post.tasks import TaskDataConfig, build_task_data
from lmforge.post.sft import SFTConfig, load_sft_config, sft


def sft_cmd(
    base: Optional[str] = typer.Option(None, "--base", help="The model to fine-tune: a train run, an `lmforge import-hf` "
                                       "directory or an HF export (imported into OUT/base)."),
    data: Optional[str] = typer.Option(None, "--data", help='Conversations, one {"messages": [{"role": ..., "content": ...}]} '
                                       "per record: JSONL, parquet, a saved HF dataset directory or a hub name."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help=f"Run directory (default {SFTConfig.out})."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help=f"Passes over the conversations (default {SFTConfig.epochs})."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps, instead of --epochs."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate (default {SFTConfig.lr})."),
    no_packing: bool = typer.Option(False, "--no-packing", help="One conversation per row, padded, instead of packed rows."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count bad records instead of stopping at the first."),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: continue from the newest valid checkpoint in --out; "
                                         "never (the default); or a checkpoint directory."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with an \\[sft] table (and \\[sft.guard])."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override any key: --set sft.batch_size=16"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Fine-tune a base model on conversations (supervised fine-tuning).

    The tokenizer's chat template renders each conversation; the loss counts only the
    assistant's tokens and the <|end|> that closes each turn, so the model learns to stop.
    Conversations are packed into full rows, each attending only to itself; one longer than
    the model's context is dropped and counted, never truncated.

    Examples:

      lmforge sft --base runs/default/train --data chats.jsonl -o runs/sft

      lmforge sft --base runs/default/hf --data chats.parquet --epochs 3 --lr 1e-4 -o runs/sft

      lmforge sft --base runs/d4 --data chats.jsonl -o runs/sft --resume auto

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(base=base, data=data, out=str(out) if out else None, epochs=epochs, max_steps=steps, lr=lr,
                      packing=False if no_packing else None, skip_bad=skip_bad or None)
    cfg = load_sft_config(config, set_, flags)
    man = sft(cfg, resume=resume or "never", progress=not quiet)
    m = man["metrics"]
    print(f"sft: {m['train_conversations']} conversations in {m['rows']} rows ({m['row_fill']:.0%} full), "
          f"dropped {m['dropped'] or 'none'}, skipped {m['skipped_lines'] or 'none'}; "
          f"val loss {m['final_val_loss']:.4f}; model in {cfg.out}")


def chat_cmd(
    model: Path = typer.Argument(..., help="A chat model: an SFT/DPO run, an lmforge model directory or an HF directory."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start with."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature; 0 is greedy."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens per reply."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass; 1 disables."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    knowledge: Optional[Path] = typer.Option(None, "--knowledge", help="An index from `lmforge index`: each turn "
                                             "gets the top chunks quoted in its prompt, and the sources are listed."),
):
    """Chat with a model in the terminal; replies stream as they are generated.

    Commands: /reset clears the history, /system TEXT sets the system message, /quit (or
    end of input) leaves. Old turns are dropped when the conversation outgrows the context.

    Example: lmforge chat runs/sft --temperature 0.2
    """
    chat = open_chat(model)
    chat.system = system or ""
    kb = None
    if knowledge is not None:
        kb = open_knowledge(knowledge, lambda t: len(chat.tok.encode(t, add_special_tokens=False).ids),
                            chat.model.cfg.context)
    cfg = SampleConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset, /system TEXT, /quit", flush=True)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
            continue
        if text.startswith("/system"):
            chat.system = text[len("/system"):].strip()
            print(f"(system: {chat.system or 'none'})", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        cited: list = []

        def augment(messages):
            out, cites = kb.augment(messages)
            cited[:] = cites
            return out, cites

        for piece in reply(chat, text, cfg, augment if kb is not None else None):
            print(piece, end="", flush=True)
        print(flush=True)
        for i, c in enumerate(cited, 1):
            print(f"  [source {i}] {c['source']}:{c['start']}-{c['end']} (line {c['line']})", flush=True)


def dpo_cmd(
    policy: Optional[str] = typer.Option(None, "--policy", help="The starting policy, also the frozen reference: "
                                         "an SFT run, an lmforge model directory or an HF directory."),
    data: Optional[str] = typer.Option(None, "--data", help="Preference pairs in TRL's format, prompt / chosen / rejected "
                                       "(strings or message lists): JSONL, parquet, a saved HF dataset or a hub name."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help=f"Run directory (default {DPOConfig.out})."),
    beta: Optional[float] = typer.Option(None, "--beta", help=f"Strength of the pull toward the reference (default {DPOConfig.beta})."),
    loss: Optional[str] = typer.Option(None, "--loss", help="sigmoid (DPO, the default), ipo, or sigmoid_norm "
                                       "(DPO on per-token averages: length-normalised)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help=f"Passes over the pairs (default {DPOConfig.epochs})."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps, instead of --epochs."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Peak learning rate (default {DPOConfig.lr})."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count bad pairs instead of stopping at the first."),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: continue from the newest valid checkpoint in --out; "
                                         "never (the default); or a checkpoint directory."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with a \\[dpo] table (and \\[dpo.guard])."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override any key: --set dpo.val_fraction=0.2"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Preference-tune a model on chosen/rejected pairs (DPO, IPO).

    The reference model is the starting policy; its log-probabilities are computed once and
    cached in the run directory. Held-out pairs give the preference accuracy and reward margin,
    logged at every evaluation.

    Examples:

      lmforge dpo --policy runs/sft --data pairs.jsonl -o runs/dpo

      lmforge dpo --policy runs/sft --data pairs.jsonl --loss ipo --beta 0.5 -o runs/ipo

    Precedence: defaults < --config file < --set < flags.
    """
    flags = flag_tree(policy=policy, data=data, out=str(out) if out else None, beta=beta, loss=loss, epochs=epochs,
                      max_steps=steps, lr=lr, skip_bad=skip_bad or None)
    cfg = load_dpo_config(config, set_, flags)
    man = dpo(cfg, resume=resume or "never", progress=not quiet)
    m = man["metrics"]
    print(f"dpo: {m['train_pairs']} pairs in {m['rows']} rows, dropped {m['dropped'] or 'none'}, skipped "
          f"{m['skipped_lines'] or 'none'}; held-out preference accuracy {m['final_pref_accuracy']:.3f}, reward margin "
          f"{m['final_reward_margin']:.4f}; reference {m['ref_cache']}; model in {cfg.out}")


def post_data_cmd(
    source: Optional[List[Path]] = typer.Option(None, "--source", "-s", help="A directory of .py files (repeatable; "
                                                "default: this Python's standard library)."),
    out: Path = typer.Option(Path(TaskDataConfig.out), "--out", "-o", help="Where to write the JSONL files and manifest."),
    test_percent: int = typer.Option(TaskDataConfig.test_percent, "--test-percent", help="Share of source files held out."),
    task_test_percent: int = typer.Option(TaskDataConfig.task_test_percent, "--task-test-percent",
                                          help="Share held out of the files that carry an executable task (they are few)."),
    methods: bool = typer.Option(TaskDataConfig.methods, "--methods/--no-methods",
                                 help="Conversations from methods too (tasks come from module-level functions)."),
    max_chars: int = typer.Option(TaskDataConfig.max_chars, "--max-chars", help="Longest function source kept."),
    no_decontaminate: bool = typer.Option(False, "--no-decontaminate", help="Skip the HumanEval 13-gram filter."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Build SFT conversations and executable doctest tasks from Python source, offline.

    Every public function and method with a docstring gives two conversations (write it;
    explain it). A module-level function whose doctests call it becomes an executable task when,
    run after its module's imports, its own source passes them and a stub returning None fails
    them. Files are held out whole, and anything sharing a 13-gram with HumanEval is dropped and
    counted.

    Example: lmforge post-data -o runs/post-data && lmforge sft --base runs/d4 --data runs/post-data/sft_train.jsonl
    """
    cfg = TaskDataConfig(sources=[str(s) for s in source or []], out=str(out), test_percent=test_percent,
                         task_test_percent=task_test_percent, methods=methods,
                         max_chars=max_chars, decontaminate=not no_decontaminate)
    m = build_task_data(cfg, progress=not quiet)["metrics"]
    print(f"post data: {m['files']} files; made {m['made']}; dropped {m['dropped'] or 'none'}; in {out}")


def distill_cmd(
    teacher: str = typer.Option(..., "--teacher", help="A local model (lmforge or HF directory) or an OpenAI-compatible "
                                "base URL such as http://127.0.0.1:8000/v1."),
    student: str = typer.Option(..., "--student", help="The student: a model directory, or depth=N for a new model "
                                "shaped like a local teacher at depth N."),
    prompts: Path = typer.Option(..., "--prompts", help='JSONL: {"prompt": "..."} or {"messages": [...]} per line.'),
    out: Path = typer.Option(Path(DistillConfig.out), "--out", "-o", help="Run directory: answers cache and the student."),
    teacher_model: str = typer.Option("", "--teacher-model", help="The model name the endpoint serves."),
    api_key_env: str = typer.Option(DistillConfig.api_key_env, "--api-key-env",
                                    help="Environment variable that holds the endpoint's API key."),
    max_new_tokens: int = typer.Option(DistillConfig.max_new_tokens, "--max-new-tokens", help="Longest teacher answer."),
    temperature: float = typer.Option(DistillConfig.temperature, "--temperature", help="Teacher sampling temperature."),
    alpha: float = typer.Option(0.0, "--alpha", help="Logit distillation's share of the loss, with a local teacher that "
                                "shares the student's tokenizer: forward KL on the teacher's top-k logits; 0: answers only."),
    top_k: int = typer.Option(DistillConfig.top_k, "--top-k", help="Teacher logits kept per position for --alpha."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Student optimizer steps (default: sft.epochs)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="auto: keep the cached answers and continue the student."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with a \\[sft] table for the student."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Student training keys: --set sft.lr=1e-3"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Distil a teacher into a student: the teacher answers the prompts, the student trains on the answers.

    Answers are cached in OUT/teacher_answers.jsonl and never asked twice; an endpoint is
    retried with backoff and a prompt that still fails is counted. The student's manifest names
    its teacher.

    Examples:

      lmforge distill --teacher runs/sft --student depth=2 --prompts prompts.jsonl -o runs/distill

      OPENAI_API_KEY=... lmforge distill --teacher http://127.0.0.1:8000/v1 --teacher-model big \\
          --student runs/small --prompts prompts.jsonl -o runs/distill
    """
    scfg = load_sft_config(config, set_, flag_tree(max_steps=steps))
    cfg = DistillConfig(teacher=teacher, teacher_model=teacher_model, api_key_env=api_key_env, student=student,
                        prompts=str(prompts), out=str(out), max_new_tokens=max_new_tokens, temperature=temperature,
                        alpha=alpha, top_k=top_k, sft=scfg)
    man = distill(cfg, resume=resume or "never", progress=not quiet)
    t = man["teacher_answers"]
    print(f"distill: {t['used']} teacher answers ({t['cached']} cached, {t['failed']} failed); student val loss "
          f"{man['metrics']['final_val_loss']:.4f}; model in {out}")


def pairs_cmd(
    model: str = typer.Option(..., "--model", help="The policy whose own answers are judged (an SFT run, say)."),
    data: Path = typer.Option(..., "--data", help="Conversations whose last turn is the reference (post-data's sft_train.jsonl)."),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="Executable tasks (post-data's tasks_train.jsonl), matched by prompt."),
    out: Path = typer.Option(Path(PairsConfig.out), "--out", "-o", help="Where pairs.jsonl and the manifest go."),
    samples: int = typer.Option(PairsConfig.samples, "--samples", help="Answers sampled per request."),
    temperature: float = typer.Option(PairsConfig.temperature, "--temperature", help="Sampling temperature."),
    max_new_tokens: int = typer.Option(PairsConfig.max_new_tokens, "--max-new-tokens", help="Longest sampled answer."),
    limit: int = typer.Option(0, "--limit", help="Use only the first N requests (0: all)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Build on-policy DPO pairs: the model's own answers that fail (do not parse, or fail their doctest
    in the sandbox) are rejected against the reference.

    Example: lmforge post-pairs --model runs/sft --data runs/post-data/sft_train.jsonl \\
        --tasks runs/post-data/tasks_train.jsonl -o runs/pairs && lmforge dpo --policy runs/sft --data runs/pairs/pairs.jsonl
    """
    cfg = PairsConfig(model=model, data=str(data), tasks=str(tasks or ""), out=str(out), samples=samples,
                      temperature=temperature, max_new_tokens=max_new_tokens, limit=limit)
    m = build_pairs(cfg, progress=not quiet)["metrics"]
    print(f"pairs: {m['pairs']} from {m['samples']} samples of {m['requests']} requests; verdicts {m['verdicts']}; in {out}")
