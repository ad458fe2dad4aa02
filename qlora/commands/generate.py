"""`qlora generate TARGET [--prompt TEXT]`: answer a prompt, or chat interactively.

Generate with TARGET (a run folder, a recipe file, or a model name/folder; a run folder's adapter
is used unless --base). Without --prompt, chat on standard input (an empty line or EOF ends; /reset
clears the history; an unknown /command is named, never sent to the model). Several --adapter NAME=DIR load onto one base: --use NAME picks the one that
answers (default: the first), and in chat `/adapter NAME` switches (`/adapter none`: the base).
"""

from __future__ import annotations

import argparse

from qlora.inference.target import add_target_arguments
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer a prompt or chat with a model (+ adapter)", description=__doc__.split("\n\n", 1)[1])
    add_target_arguments(p)
    p.add_argument("--prompt", help="one prompt to answer (otherwise interactive chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass when sampling")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--no-chat", action="store_true", help="plain text completion, no chat template")
    p.add_argument("--use", metavar="NAME", help="the --adapter NAME that answers (default: the first; none: the base)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qlora import runtime
    from qlora.errors import UsageError
    from qlora.inference.generate import generate
    from qlora.inference.target import load_for_inference, resolve_target

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError(f"--temperature must be >= 0 and --top-p in (0, 1]; got {args.temperature}, {args.top_p}")
    target = resolve_target(args.target, args.overrides, args.adapter, args.base)
    rt = runtime.setup(target.cfg.train.device, target.cfg.model.dtype, target.cfg.train.threads)
    model, tokenizer, adapters = load_for_inference(target, rt.device)
    print(f"{target.describe(model)}; prompts as {'raw text' if args.no_chat else target.style}",
          file=sys.stderr, flush=True)
    if args.use is not None:
        adapters.set_adapter(None if args.use == "none" else args.use)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   chat=not args.no_chat, seed=args.seed, style=target.style)
    if args.prompt is not None:
        print(generate(model, tokenizer, args.prompt, **options))
        return 0
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        if line.startswith("/"):
            print(chat_command(line.split(), history, adapters), file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": line.strip()})
        answer = generate(model, tokenizer, history if not args.no_chat else line.strip(), **options)
        history.append({"role": "assistant", "content": answer})
        print(f"{'bot> ' if interactive else ''}{answer}", flush=True)


COMMANDS = "/reset (clear the history), /adapter [NAME|none] (switch or list adapters)"


def chat_command(words: list[str], history: list[dict], adapters) -> str:
    """A `/command` line in chat (never sent to the model); returns what to tell the user."""
    if words[0] == "/reset":
        history.clear()
        return "history cleared"
    if words[0] == "/adapter":
        return switch(adapters, words[1:])
    return f"unknown command {words[0]}; commands: {COMMANDS}"


def switch(adapters, words: list[str]) -> str:
    """`/adapter [NAME|none]` in chat: switch (or list) the adapters; returns what to tell the user."""
    from qlora.errors import UsageError

    loaded = ", ".join(adapters.adapters) or "none loaded"
    if len(words) != 1:
        return f"adapters: {loaded}; active: {adapters.active or 'none'} (/adapter NAME|none switches)"
    try:
        adapters.set_adapter(None if words[0] == "none" else words[0])
    except UsageError as err:
        return str(err)
    return f"adapter: {adapters.active or 'none (the base model)'}"
