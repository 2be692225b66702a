"""The one error path of the ``rwkv-jax`` command.

:func:`run_command` runs a command's ``run(args)`` and turns

* every anticipated error (the library's ``ValueError`` family: ConfigError,
  CheckpointError, StateError, DataError, tokenizer errors; ``OSError`` such as a missing,
  unreadable or unwritable file or a full disk; a missing optional package) into one line
  ``rwkv-jax CMD: error: MESSAGE`` on stderr and exit status 2, without a traceback;
* a closed stdout pipe (``rwkv-jax generate ... | head -c 10``) into a quiet exit, as Unix
  tools do (status 141 = 128 + SIGPIPE);
* Ctrl-C into one line and status 130. The Ctrl-C is also remembered
  (:func:`check_interrupted`): a KeyboardInterrupt raised while Python runs a library's
  callback (JAX's garbage-collection hook, a pytree flatten called from C++) can be
  swallowed there (jax-ml/jax#18246), and a long loop would then go on for ever; the
  command's loops check the flag once per step.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable

USAGE_ERROR = 2
INTERRUPTED = 130
BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)


def one_line(message: str) -> str:
    """``message`` on one line: a multi-line message ("does not fit:\\n  a\\n  b") becomes
    "does not fit: a; b"."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def describe(e: BaseException) -> str:
    """The user-facing text of an anticipated error."""
    if isinstance(e, OSError) and e.strerror:  # "[Errno 2] ..." -> "PATH: No such file ..."
        text = f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
        if e.filename2 is not None:
            text += f" (-> {e.filename2})"
        return one_line(text)
    return one_line(str(e) or type(e).__name__)


_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    """SIGINT: remember it, then raise KeyboardInterrupt as Python's own handler does."""
    _interrupted.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came during this command, even if the one raised
    then was swallowed on its way (see the module docstring). Call once per loop step."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def _anticipated(e: BaseException) -> bool:
    if isinstance(e, (ValueError, OSError, ModuleNotFoundError)):
        return True
    # ImportError("... needs the `tokenizers` package") raised by the library carries no
    # module name; "cannot import name X from Y" (name set) is a bug and keeps its traceback
    return isinstance(e, ImportError) and e.name is None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of the dead pipe cannot
    raise again (Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured)
        pass


def run_command(name: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                *, interrupted: str = "interrupted") -> int:
    """``run(args)`` with the error mapping of the module docstring; the exit status."""
    _interrupted.clear()
    # remember Ctrl-C, unless the embedding program has a SIGINT handler of its own
    own = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handler, not at exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        # after the terminal's "^C" (or a progress bar), start a line of our own
        start = "\n" if sys.stderr.isatty() else ""
        print(f"{start}rwkv-jax {name}: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:  # noqa: BLE001 - only the anticipated ones are swallowed
        if not _anticipated(e):
            raise
        print(f"rwkv-jax {name}: error: {describe(e)}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        if own:
            signal.signal(signal.SIGINT, signal.default_int_handler)
