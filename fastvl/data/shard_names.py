"""Shard names and how to open them: WebDataset's brace patterns, local files, ``pipe:`` commands, http(s).

A spec is a pattern (``'shards/{000..009}.tar'``, ``{a,b}`` lists, several braces, shell globs for local
files) or several joined by ``::``. Each name it expands to is a local path, ``pipe:COMMAND`` (the tar is
the command's standard output, as in webdataset: ``'pipe:curl -s https://host/{000..009}.tar'``) or an
``http://`` / ``https://`` URL (read with the standard library).
"""

from __future__ import annotations

import contextlib
import glob
import re
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from typing import BinaryIO

BRACE = re.compile(r"\{([^{}]*)\}")
REMOTE_PREFIXES = ("pipe:", "http://", "https://")


def expand_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Expand WebDataset brace patterns: ``'s/{000..003}.tar'`` -> 4 names (zero-padded like the lower bound),
    ``'{a,b}'`` -> alternatives, several braces multiply; ``::`` separates several patterns; a pattern with
    ``*`` or ``?`` is a glob of local files (sorted). A list of patterns expands each."""
    if not isinstance(pattern, str):
        return [p for pat in pattern for p in expand_pattern(pat)]
    if "::" in pattern:
        return expand_pattern(pattern.split("::"))
    m = BRACE.search(pattern)
    if m is None:
        if any(ch in pattern for ch in "*?[") and not is_remote(pattern):
            return sorted(glob.glob(pattern))
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"expand_pattern: empty range {{{body}}} in {pattern!r}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"expand_pattern: cannot expand {{{body}}} in {pattern!r} (use {{000..009}} or {{a,b}})")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [p for opt in options for p in expand_pattern(head + opt + tail)]


def is_remote(url: str) -> bool:
    """Whether ``url`` is a ``pipe:`` command or an http(s) URL (not a local path)."""
    return url.startswith(REMOTE_PREFIXES)


def is_shard_spec(spec: str) -> bool:
    """Whether a ``--data`` spec names tar shards (``.tar`` names, brace patterns, ``pipe:`` or http(s))."""
    if not isinstance(spec, str):
        return False
    return ".tar" in spec and (spec.endswith(".tar") or bool(BRACE.search(spec)) or is_remote(spec) or "::" in spec)


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """A binary stream of one shard: a local file, the output of a ``pipe:`` command (its exit status is
    checked when the stream was read to the end) or an http(s) response."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        try:
            yield proc.stdout
        except GeneratorExit:  # the reader stopped early: the command is not needed any more
            proc.kill()
            proc.stdout.close()
            proc.wait()
            raise
        except BaseException as e:  # a read error: a failed command is the likelier cause, say so
            proc.stdout.close()
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise e from None
            if rc != 0:
                raise OSError(f"shard command {url[5:]!r} exited with status {rc}") from e
            raise
        proc.stdout.read()  # what tarfile leaves unread: the end-of-archive padding
        proc.stdout.close()
        rc = proc.wait()
        if rc != 0:
            raise OSError(f"shard command {url[5:]!r} exited with status {rc}")
    elif url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=60) as response:
            yield response
    else:
        with open(url, "rb") as f:
            yield f


def compact_pattern(paths: Sequence[str]) -> str:
    """``['d/000.tar', ..., 'd/006.tar']`` -> ``'d/{000..006}.tar'`` (when the names are such a run)."""
    m0 = re.fullmatch(r"(.*?)(\d+)(\.tar)", paths[0])
    if len(paths) > 1 and m0:
        head, first, tail = m0.groups()
        want = [f"{head}{str(int(first) + i).zfill(len(first))}{tail}" for i in range(len(paths))]
        if list(paths) == want:
            return f"{head}{{{first}..{str(int(first) + len(paths) - 1).zfill(len(first))}}}{tail}"
    return "::".join(paths)
