"""What a tritonserver log says when the server fails: its errors first, without a GPU-less host's noise.

Triton writes `E1207 15:45:32.894349 9302 main.cc:257] "message"` lines (I, W or E for the level); Python
tracebacks of the stubs and of rank processes, and the server's last words (`error: creating server: ...`),
come without that prefix.
"""

from __future__ import annotations

import re

NOISE = ("NVML", "DCGM", "CudaDriverHelper", "pinned memory pool", "CUDA driver version is insufficient")
"""Lines every server on a host without (usable) GPUs writes; they never say why it failed."""
_TRITON_LINE = re.compile(r"^([IWE])\d{4} [\d:.]+ +\d+ [^\]]*\] ?(.*)$")
_UNPREFIXED_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception)|error): ")
_STOP_SIGNAL = re.compile(r"^Signal \(\d+\) received\.$", re.MULTILINE)
STOP_VERDICT = "; stopping the server"
"""How a model that stops the server ends its one-line reason (the reference tensorrt_llm model, whose rank or
engine process died): the cause, where the requests that were in flight log only what they ran into."""


def _message(text: str) -> str:
    """The first line of a Triton message (quoted, with `\\n` escapes for its newlines)."""
    text = text.strip()
    if text.startswith('"'):
        text = text[1:-1] if text.endswith('"') and len(text) > 1 else text[1:]
    return text.split("\\n", 1)[0].strip()


def error_lines(text: str) -> list[str]:
    """One line per error, oldest first: Triton's E lines, Python exceptions and `error:` lines, each once."""
    out: list[str] = []
    for line in text.splitlines():
        m = _TRITON_LINE.match(line)
        if m:
            if m.group(1) != "E":
                continue
            message = _message(m.group(2))
        elif _UNPREFIXED_ERROR.match(line):
            message = line.strip()
        else:
            continue
        if message and message not in out and not any(n in message for n in NOISE):
            out.append(message)
    return out


def failure_cause(text: str) -> str | None:
    """The error that says why the server failed: a model's stop verdict, else the first error; None without."""
    errors = error_lines(text)
    return next((e for e in errors if e.endswith(STOP_VERDICT)), errors[0] if errors else None)


def stop_signalled(text: str) -> bool:
    """Whether the server was told to stop (`Signal (15) received.`, written before it unloads any model)."""
    return _STOP_SIGNAL.search(text) is not None


def last_lines(text: str, count: int = 10) -> list[str]:
    """The last `count` lines that say something: no noise, no tables, no blank lines."""
    keep = [line for line in text.splitlines()
            if line.strip() and not line.startswith(("+", "|")) and not any(n in line for n in NOISE)]
    return keep[-count:]


def failure_report(text: str, log_path: object, max_errors: int = 8) -> str:
    """The errors of the log (else its last lines), indented, and where the whole log is."""
    errors = error_lines(text)
    lines = errors[:max_errors] or last_lines(text)
    more = f" (+{len(errors) - max_errors} more)" if len(errors) > max_errors else ""
    head = f"errors in the log{more}:" if errors else "no error in the log; its last lines:"
    return "\n".join([head, *(f"  {line}" for line in lines), f"log: {log_path}"])
