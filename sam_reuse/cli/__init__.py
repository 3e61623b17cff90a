"""``export-and-tune``: a thin command-line layer over the Python API.

One module per command group (``export``, ``graph``, ``tune``, ``engine``,
``peft``), each registering its subcommands and their handlers; shared
option groups are declared once in ``common``. Every user error surfaces as
one line on stderr naming the file or option at fault, with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Callable, Iterator, Sequence

from sam_reuse.base.errors import SamReuseError
from sam_reuse.base.files import STORAGE_ERRORS
from sam_reuse.base.runtime import THREADS_VARIABLE
from sam_reuse.cli import engine, export, graph, peft, tune

COMMAND_GROUPS = (export, graph, tune, engine, peft)
DESCRIPTION = ("Adapt a Segment Anything model to an image domain by channel reuse, without training, and ship it as "
               "ONNX models and TensorRT engines.")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    """The parser and each subcommand's handler."""
    parser = argparse.ArgumentParser(prog="export-and-tune", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("--threads", type=int,
                        help="ONNX Runtime threads (default: $SAM_REUSE_THREADS, else every physical core)")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for group in COMMAND_GROUPS:
        handlers.update(group.register(sub))
    return parser, handlers


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show warnings (skipped records, ...) as one 'export-and-tune: warning:' message each."""
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *_args, **_kwargs: print(f"export-and-tune: warning: {message}",
                                                                    file=sys.stderr)
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--debug", "--threads"):
        argv.insert(0, "run")  # `export-and-tune --model-type ...` runs the whole pipeline
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print("export-and-tune: error: --threads must be at least 1", file=sys.stderr)
            return 2
        os.environ[THREADS_VARIABLE] = str(args.threads)  # every session this process opens reads it
    try:
        with _warnings_to_stderr():
            return handlers[args.command](args)
    except SamReuseError as exc:
        print(f"export-and-tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export-and-tune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: a bug, or a case no check foresaw
        if args.debug:
            raise
        if isinstance(exc, MemoryError) or "Failed to allocate memory" in str(exc):  # numpy, ONNX Runtime
            print("export-and-tune: error: the model needs more memory than this machine has (a shape too large "
                  "for it, or a model for a bigger machine); nothing was written", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRORS:  # a write outside the output helpers
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"export-and-tune: error: {where}{exc.strerror} (free space or choose another folder)",
                  file=sys.stderr)
            return 2
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"export-and-tune {args.command}: unexpected error: {type(exc).__name__}"
              f"{': ' + detail if detail else ''} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
