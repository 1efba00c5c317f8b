"""What every lvdm command does with a user mistake: one line on stderr and a non-zero exit, no traceback.

Exit codes: 2 for a configuration or usage error (nothing was loaded), 1 for any other
user-facing problem (a file that cannot be used, a dataset that is mostly bad), 75
(:data:`EXIT_STOPPED`, "temporary failure") when a run was stopped by SIGTERM/SIGINT after saving a
checkpoint: rerun with ``train.resume=auto`` to continue; 130 for Ctrl-C before anything was saved;
141 when the reader of the output went away (``python train.py --help-config | head``), silently; 143 for SIGTERM
outside a training run's steps, after what was being written is cleaned up.
Anything that is not an :class:`~lvdm.errors.LvdmError` is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import io
import os
import re
import signal
import stat
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from lvdm.errors import ConfigError, LvdmError
from lvdm.runtime import prefer_passive_waiting

EXIT_STOPPED = 75  # stopped by a signal after saving: resumable (EX_TEMPFAIL)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool killed by the signal reports
EXIT_TERMINATED = 143  # 128 + SIGTERM, as if killed by it, after cleaning up


QUIET_LIBRARIES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def quiet_libraries() -> None:
    """Keep diffusers'/transformers' load-time chatter (progress bars, optional-backend notices) off the terminal:
    :data:`QUIET_LIBRARIES`, where the environment does not set them already."""
    for key, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    """A warning on the command line is one line, ``warning: ...``, as an error is ``error: ...``; Python's form
    adds the warning's class and a source line, which say nothing to someone running a command."""
    return f"warning: {' '.join(str(message).split())}\n"


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and turn user errors into an exit code."""
    quiet_libraries()
    prefer_passive_waiting()  # before torch loads OpenMP: on a busy machine threads sleep, not spin
    args = sys.argv[1:] if argv is None else argv
    _open_closed_streams()
    previous = _signals_as_exceptions()
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        try:
            _check_cache_folders()
            code = main(args) or 0
        except SystemExit as exc:  # argparse: --help (0), a usage error (2, already printed)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
        sys.stdout.flush()  # a closed pipe or a full disk shows here, not in the interpreter's last flush
        return code
    except Terminated:
        _hold_signals(previous)
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LvdmError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _hold_signals(previous)
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # torch's allocators raise RuntimeErrors (OutOfMemoryError on CUDA)
        if isinstance(exc, RuntimeError) and not _OUT_OF_MEMORY.search(str(exc)):
            raise
        print("error: out of memory (the machine's, the GPU's or a ulimit's): try a smaller batch, size or number "
              "of frames, or a smaller chunk", file=sys.stderr)  # fmt: skip
        return 1
    except OSError as exc:  # after LvdmError: lvdm's own write errors are OSErrors too, with their own message
        names = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        if exc.errno in _DENIED:  # a file or folder this user may not read or write: the machine's state too
            print(f"error: {exc.strerror or exc}: {names or 'a file'} (check its permissions)", file=sys.stderr)
            return 1
        if exc.errno == errno.ENAMETOOLONG:  # a path given: a usage error, wherever it is first used
            print(f"error: {exc.strerror}: {names or 'a path'} (a name holds at most 255 bytes)", file=sys.stderr)
            return 2
        if exc.errno not in _FULL:
            raise
        where = exc.filename or ("stdout" if _stdout_fails() else "the output")  # a file object's write names none
        _silence_stdout()  # what could not be written is dropped, so that exiting does not fail on it again
        print(f"error: {exc.strerror or exc} writing {where}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning  # run in a test's process, the next test gets Python's form back
        for signum in list(_SENT_AGAIN):
            if (timer := _SENT_AGAIN.pop(signum, None)) is not None:  # not sent in the meantime
                timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Terminated(BaseException):  # noqa: N818 (a signal, as KeyboardInterrupt is)
    """SIGTERM, raised where the command is, so that what it was writing is cleaned up as on Ctrl-C (killed at
    once, it left its temporary files behind)."""


def _signals_as_exceptions() -> dict[int, Any]:
    """SIGTERM raises :class:`Terminated` in this process (a forked worker still dies of it at once), and SIGINT
    KeyboardInterrupt as Python's own handler does, both outside finalizers (:func:`raise_outside_finalizers`);
    the handlers they replace, by signal, where they are ours to set (the main thread, Python's defaults)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    owner = os.getpid()

    def terminate(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked child (a data worker) dies as it would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise_outside_finalizers(signum, frame, Terminated)

    def interrupt(signum: int, frame: Any) -> None:
        raise_outside_finalizers(signum, frame, KeyboardInterrupt)

    ours = {signal.SIGTERM: (signal.SIG_DFL, terminate), signal.SIGINT: (signal.default_int_handler, interrupt)}
    return {sig: signal.signal(sig, handler) for sig, (default, handler) in ours.items()
            if signal.getsignal(sig) is default}  # fmt: skip


_FINALIZER_CODES = (weakref.finalize.__call__.__code__,)


def raise_outside_finalizers(signum: int, frame: Any, exception: type[BaseException]) -> None:
    """Raise ``exception`` where the command is. Inside a ``__del__`` (a library's object collected at that
    moment) Python discards it with an "Exception ignored" traceback, and the command ran on and exited 0: there
    the signal is sent again 10 ms later, to land outside. Signals that land in finalizers while one is waiting to
    be sent again are that one: each sent again of its own raised a second exception while the first was reported
    (a traceback after "terminated")."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code in _FINALIZER_CODES:
            if signum not in _SENT_AGAIN:
                again = threading.Timer(0.01, _send_again, (signum,))
                again.daemon = True
                _SENT_AGAIN[signum] = again
                again.start()
            return
        frame = frame.f_back
    raise exception


_SENT_AGAIN: dict[int, threading.Timer] = {}  # by signal, until sent; cancelled when the command ends


def _send_again(signum: int) -> None:
    _SENT_AGAIN.pop(signum, None)  # before it lands: if it lands in a finalizer again, it is sent again again
    signal.pthread_kill(threading.main_thread().ident, signum)


def _hold_signals(ours: dict[int, Any]) -> None:
    """While a stopped command says so and cleans up, a further SIGTERM or Ctrl-C (a second ``kill``, a key held
    down) is ignored: raised inside the report, it was a traceback and exit 1. ``ours`` are the signals whose
    handlers :func:`run_cli` set, and restores when it returns."""
    for sig in ours:
        signal.signal(sig, signal.SIG_IGN)


def _check_cache_folders() -> None:
    """PyTorch makes ``TORCHINDUCTOR_CACHE_DIR`` when diffusers imports it, compiling or not: a path at a file (or
    under one) was a FileExistsError traceback from the import."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        return
    from lvdm.fileio import nearest_existing

    probe = nearest_existing(cache)
    if not probe.is_dir():
        raise ConfigError(f"TORCHINDUCTOR_CACHE_DIR={cache}: {probe} is not a folder; PyTorch keeps compiled kernels "
                          "there: give a folder, or unset it")  # fmt: skip


_FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota: the machine's state, not a bug
_DENIED = (errno.EACCES, errno.EPERM)


def _open_closed_streams() -> None:
    """A command started with stdout or stderr closed (``>&-``) writes them to the null device instead; a path
    stdout cannot encode (``PYTHONIOENCODING=ascii``) is printed escaped, as stderr does, not a traceback after
    the work is done."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            stream = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
            atexit.register(stream.close)
            setattr(sys, name, stream)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|bad_alloc", re.IGNORECASE)
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default in --help except the unset ones (None, False, "",
    []) and those whose help already says it. (``in (None, False, [])`` took a default of 0 for unset: 0 == False.)"""

    def _get_help_string(self, action: argparse.Action) -> str:
        unset = action.default is None or action.default is False or action.default in ("", [])
        if unset or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse for lvdm's commands: a usage error is one line (a :class:`ConfigError`, exit 2 through
    :func:`run_cli`), and ``--help`` that cannot be written (a full disk, a closed pipe) is not a silent success
    (argparse drops the write's error). ``--guidance -1e3`` and ``--guidance -inf`` are values, as ``-1`` is
    (argparse took them for options: "expected one argument"), so the value's own check answers. An option that
    takes one value takes one (:class:`_StoreOnce`: repeated, with the same value); the repeatable ones say so."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own knows only -1 and -1.5
        self.register("action", None, _StoreOnce)  # argument groups and subcommands share this registry
        self.register("action", "store", _StoreOnce)
        self.given: dict[str, Any] = {}

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.given = {}  # the single-value options given so far, by dest: another value is refused
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]  (raises instead of exiting)
        command = f"python {self.prog}" if self.prog.endswith(".py") else self.prog
        raise ConfigError(f"{message} ({command} --help lists the options)")

    def print_help(self, file: Any = None) -> None:
        (file or sys.stdout).write(self.format_help())


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store``, refusing a second, other value: ``--negative-prompt a --negative-prompt b`` sampled with
    ``b`` alone, without a word (every single-value option kept its last). The same value again loses nothing."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if option_string is not None:  # an option (a positional is given once by its place)
            if self.dest in parser.given and repr(parser.given[self.dest]) != repr(values):  # NaN is NaN again
                parser.error(f"argument {'/'.join(self.option_strings)}: given twice ({parser.given[self.dest]!r}, "
                             f"then {values!r}); give it once")  # fmt: skip
            parser.given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)


def example_steps(parser: argparse.ArgumentParser, steps: int | None, *, tiny: bool) -> int:
    """The examples' ``--steps``: given, or 25 (3 on ``--tiny``'s models); below 1 a usage error before anything is
    built or loaded (``--tiny`` took none: 0 and 100000 both ran 3)."""
    if steps is not None and steps < 1:
        parser.error(f"--steps must be at least 1, got {steps}")
    return steps if steps is not None else 3 if tiny else 25


def device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """The ``--device`` and ``--dtype`` of a sampling command: ``auto`` is cuda, else mps, else cpu, and fp16 on
    cuda, fp32 elsewhere; a device this machine lacks is a :class:`ConfigError`."""
    import torch

    from lvdm.pipeline import device_problem

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if problem := device_problem(device):
        raise ConfigError(f"--device {device}: {problem}")
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    return device, dtype


def exit_status(result: object) -> int:
    """0, or :data:`EXIT_STOPPED` with one line on stderr (rank 0) when a training run was stopped by a signal."""
    if not getattr(result, "stopped_by_signal", False):
        return 0
    if os.environ.get("RANK", "0") == "0":
        print(
            f"stopped by a signal at step {getattr(result, 'step', '?')} after saving a checkpoint; resumable: "
            f"rerun with train.resume=auto (exit status {EXIT_STOPPED})",
            file=sys.stderr,
        )
    return EXIT_STOPPED


def _stdout_fails() -> bool:
    """Whether stdout is what a write error with no file name came from (a failed flush drops what it held, so
    that is not asked again): a file on a disk with no space left, or a device that takes nothing (``/dev/full``)."""
    try:
        fd = sys.stdout.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstatvfs(fd).f_bavail == 0:
            return True
        os.write(fd, b"")  # nothing written where there is room; /dev/full refuses even that
    except OSError as exc:  # io.UnsupportedOperation (no file number) is one too, with no errno
        return exc.errno in _FULL
    return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def split_overrides(args: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[list[str], list[str]]:
    """``key=value`` arguments and the rest, in order. The value of one of ``parser``'s options is never an override,
    even holding '=': ``--config runs/lr=1e-4/config.yaml`` was taken for one, and --config then had no value."""
    overrides: list[str] = []
    rest: list[str] = []
    for i, arg in enumerate(args):
        is_value = parser is not None and i > 0 and _takes_value(parser, args[i - 1])
        (overrides if "=" in arg and not arg.startswith("-") and not is_value else rest).append(arg)
    return overrides, rest


def _takes_value(parser: argparse.ArgumentParser, arg: str) -> bool:
    """Whether ``arg`` is one of ``parser``'s options (or a prefix of one long option) followed by its value."""
    if not arg.startswith("-") or "=" in arg:
        return False
    options = parser._option_string_actions  # argparse's own table: option string -> action
    actions = {id(a): a for s, a in options.items() if s == arg or (arg.startswith("--") and s.startswith(arg))}
    action = options.get(arg) or (next(iter(actions.values())) if len(actions) == 1 else None)
    return action is not None and action.nargs != 0
