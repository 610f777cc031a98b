"""`mlx-skipless COMMAND ...`: the same as `python -m mlx_skipless.COMMAND ...`.

Also what every command line shares: mlx-lm's spelling of the common flags, and
one way of ending in an error (`command`): bad input is one line on stderr and
a non-zero exit; the traceback only with --verbose.
"""

import argparse
import functools
import importlib
import importlib.util
import math
import os
import sys
import traceback


class CommandError(RuntimeError):
    """A failure the user can act on; the message says how (reported as it is)."""


COMMANDS = {
    "convert": "fuse a skipless checkpoint into its reduced form (mlx-lm model directory)",
    "generate": "generate text with a skipless or converted model",
    "chat": "chat with a skipless or converted model",
    "zoo": "browse model configs, weight tables and recipes",
    "train": "train a skipless model",
    "normfree": "remove normalization from a skipless model by fine-tuning",
    "whatif": "build a skipless what-if checkpoint from a real model's GGUF matrices",
    "fidelity": "measure how a conversion survives low-precision dtypes",
    "corpus": "build a Python training corpus with whole packages held out",
    "evaluate": "bits per byte of a model on text, beside gzip, bz2 and xz",
}

# -- flags spelled once, as mlx-lm spells them --------------------------------------------------


def add_model_args(p, help, default=None, flags=("--model",)):
    """The model read: --model (convert: --hf-path, as mlx-lm's convert), where it
    may come from the hub --revision, and --assume-skipless for checkpoints that
    do not declare themselves skipless."""
    p.add_argument(*flags, default=default, help=help)
    p.add_argument("--revision", help="hub revision: branch, tag or commit")
    p.add_argument(
        "--assume-skipless", action="store_true", help='treat a checkpoint not marked "skipless": true as skipless'
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted as in mlx-lm; not needed: mlx-skipless runs its own model code",
    )


def add_output_arg(p, help, default=None, required=False):
    """The output model directory: --mlx-path (--out, the old spelling, still parses)."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--mlx-path", default=default, help=help)
    alias(group, "--out", "mlx_path")


def alias(p, flag, dest):
    """An old or alternative spelling of another flag: parsed, not shown in --help."""
    p.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# -- numbers, checked where they enter ----------------------------------------------------------

# Every int and float flag of every command must be finite and positive, except these:
NON_NEGATIVE = {
    "budget_kl_ratio",
    "budget_top1",
    "temp",
    "top_k",
    "seed",
    "quantized_kv_start",
    "weight_decay",
    "orthogonality",
    "steps_per_norm",
    "final_steps",
}
FRACTIONS = {  # (lowest, highest, the lowest allowed itself)
    "top_p": (0.0, 1.0, False),
    "min_p": (0.0, 1.0, True),
    "warmup": (0.0, 0.99, True),
    "val_fraction": (0.0, 0.99, False),
    "cooldown": (0.0, 1.0, False),
}
BITS = {"q_bits", "kv_bits"}  # 1 to 8 bits a weight


def number(kind, dest: str):
    """An argparse type: `kind` (int or float), finite and within the flag's range."""

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        low, high, closed = FRACTIONS.get(dest, (0, math.inf, dest in NON_NEGATIVE))
        if dest in BITS:
            low, high, closed = 1, 8, True
        if value < low or (value == low and not closed) or value > high:
            span = (
                (f"from {low} to {high}" if closed else f"above {low}, up to {high}")
                if high < math.inf
                else "0 or more"
                if closed
                else "more than 0"
            )
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {span}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


class UsageError(CommandError):
    """A flag or argument the parser refused: said in one line, as argparse's exit status 2."""

    exit_code = 2


def check_numbers(parser: argparse.ArgumentParser):
    """Give every int and float flag of `parser` and its subcommands a checked type, and make
    every parsing error a UsageError, reported in one line like every other error (argparse's
    usage block is what --help is for)."""

    def error(message):
        raise UsageError(f"{message} ({parser.prog} --help lists the flags)")

    parser.error = error
    for action in parser._actions:
        if action.type in (int, float):
            action.type = number(action.type, action.dest)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                check_numbers(sub)
    return parser


# -- one way of failing -------------------------------------------------------------------------


def message(e: BaseException) -> str:
    """The error as one line, said by kind."""
    if isinstance(e, MemoryError):
        return "out of memory" + (f": {e}" if str(e) else "")
    if isinstance(e, RecursionError):
        return "input nested too deeply"
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip()) or type(e).__name__
    if isinstance(e, KeyError) and " " not in text:  # a bare key from a lookup, not a sentence
        text = f"missing {text!r}"
    if isinstance(e, (ValueError, OSError, KeyError, CommandError)):  # bad input, files, network
        return text
    return f"{type(e).__name__}: {text} (unexpected: rerun with --verbose for the traceback)"


def guarded(body, verbose=False) -> int:
    """Run body(); its return value (None: 0) is the exit status. Errors become
    one line on stderr (with --verbose, the traceback) and their kind's status:
    `exit_code` of the exception (DegradedError: 3), else 1; Ctrl-C 130; a closed
    pipe (`| head`) ends quietly with 141, as a shell's SIGPIPE would."""
    try:
        code = body()
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code or 0
    except BrokenPipeError:
        try:  # nothing more can be written; keep the interpreter's final flush quiet too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- every error ends the same way, by kind
        if verbose:
            traceback.print_exc()
        else:
            print(f"error: {message(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 1)


def _add_verbose(parser, default):
    """--verbose on the parser and its subcommands, unless the command has its own."""
    if "--verbose" not in parser._option_string_actions:
        parser.add_argument(
            "--verbose", "-v", action="store_true", default=default, help="print the full traceback of an error"
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub, argparse.SUPPRESS)  # the top level's default stands


def command(build_parser):
    """Make `main(argv=None, **kwargs)` from `body(opts, **kwargs)`: parse with
    build_parser() (which gains --verbose unless it has its own), then run the body
    guarded. `main.build_parser` stays reachable for the README's flag table;
    `main.nested` runs the command as a step of another one: its errors rise to
    the caller, which reports them once, rather than being printed here too."""

    def decorate(body):
        def parse(argv):
            parser = check_numbers(build_parser())
            _add_verbose(parser, default=False)
            return parser.parse_args(argv)

        @functools.wraps(body)
        def main(argv=None, **kwargs):
            try:
                opts = parse(argv)
            except UsageError as e:
                return guarded(functools.partial(_raise, e))
            return guarded(lambda: body(opts, **kwargs), getattr(opts, "verbose", False) is True)

        main.build_parser = build_parser
        main.nested = lambda argv, **kwargs: body(parse(argv), **kwargs)
        return main

    return decorate


def _raise(error):
    raise error


# -- the README's table of flags ----------------------------------------------------------------


def parsers():
    """(command line, parser) for every command and zoo subcommand, as the user types them."""
    for name in COMMANDS:
        parser = importlib.import_module(f"mlx_skipless.{name}").build_parser()
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for sub, subparser in subs[0].choices.items():
                yield f"{name} {sub}", subparser
        else:
            yield name, parser


def flag_table() -> str:
    """Markdown: every command and its flags (hidden old spellings and --help left out)."""
    lines = ["| command | arguments and flags |", "|---|---|"]
    for name, parser in parsers():
        items = []
        for a in parser._actions:
            if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
                continue
            items.append("/".join(f"`{s}`" for s in a.option_strings) or f"`{(a.metavar or a.dest).upper()}`")
        lines.append(f"| `mlx-skipless {name}` | {', '.join(items)} |")
    return "\n".join(lines) + "\n"


# -- the dispatcher -----------------------------------------------------------------------------


def available():
    return {c: h for c, h in COMMANDS.items() if importlib.util.find_spec(f"mlx_skipless.{c}")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = available()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mlx-skipless COMMAND [ARGS...]\n\ncommands:")
        for c, h in commands.items():
            print(f"  {c:<10} {h}")
        bad = argv and argv[0] not in ("-h", "--help")
        if bad:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2 if bad or not argv else 0
    verbose = "--verbose" in argv or "-v" in argv
    return guarded(lambda: importlib.import_module(f"mlx_skipless.{argv[0]}").main(argv[1:]), verbose)


if __name__ == "__main__":
    sys.exit(main())
