"""Where lorakit may write: it never removes or overwrites what it did not write.

Every folder lorakit creates holds a marker file (:data:`MARKER`). The rules, applied by every writer:

* an output that is also an input (same file or folder) is refused;
* a folder that lorakit replaces as a whole (``make-tiny``, ``fuse --out-format pipeline``) may be new, empty,
  or — with ``overwrite`` — a folder holding the marker; the new folder is built complete beside it and then
  swapped in (one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux), the old one is removed last;
* a folder lorakit adds files to (training ``output_dir``, ``sample --out``) may be new, empty, or one holding
  the marker; a non-empty folder without it is refused;
* an output file may be new, or — with ``overwrite`` — a file lorakit wrote (a ``.safetensors`` whose header
  carries ``lorakit.*`` metadata, or a file inside a marked folder).

Refusals raise :class:`OutputError` (a ``ValueError``: the CLI prints it as one line and exits 2).
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

MARKER = ".lorakit-output.json"
_TMP_SUFFIX = ".lorakit-tmp"
_OLD_SUFFIX = ".lorakit-old"
STALE_SECONDS = 3600  # temp files/folders of a killed writer older than this are removed on the next write


class OutputError(ValueError):
    """An output path lorakit refuses to write (would remove or overwrite something it did not write)."""


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "--out") -> None:
    """Refuse ``out`` when it is one of ``inputs`` or a folder that contains one of them."""
    out = Path(out)
    for inp in inputs:
        if inp is None or str(inp).startswith("tiny:"):
            continue
        inp = Path(inp)
        if _same(out, inp):
            raise OutputError(f"{flag} {out} is also an input ({inp}); write the result to another path")
        if out.is_dir() and inp.exists():
            try:
                inp.resolve().relative_to(out.resolve())
            except ValueError:
                continue
            raise OutputError(f"{flag} {out} contains the input {inp}; write the result to another folder")


def is_marked(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a folder lorakit created (it holds the marker file)."""
    return (Path(folder) / MARKER).is_file()


def lorakit_wrote_file(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` file whose header metadata has ``lorakit.*`` keys, a JSON report with
    ``"written_by": "lorakit"``, or any file inside a marked folder. Reads only the JSON header (never unpickles anything)."""
    path = Path(path)
    if is_marked(path.parent):
        return True
    if path.suffix == ".json":
        try:
            if path.stat().st_size > 50_000_000:
                return False
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("written_by") == "lorakit"
    if path.suffix != ".safetensors":
        return False
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                return False
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        return any(str(k).startswith("lorakit.") for k in meta)
    except (OSError, ValueError):
        return False


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark ``folder`` as written by lorakit (``kind``: pipeline, training, samples, ...)."""
    from lorakit.fileio import write_json  # lazy: fileio imports this module (clean_stale), and torch

    write_json({"written_by": "lorakit", "kind": kind}, Path(folder) / MARKER)


def _nonempty(folder: Path) -> bool:
    return any(True for _ in folder.iterdir())


def check_replace_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out",
                      inputs: Iterable = ()) -> Path:
    """Check that folder ``out`` may be replaced as a whole (see the module rules). Returns it as a Path."""
    out = Path(out)
    check_not_input(out, inputs, flag)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{flag} {out} exists and is not a folder; lorakit never replaces it (choose a new path)")
    if out.is_dir() and _nonempty(out):
        if not is_marked(out):
            raise OutputError(f"{flag} {out} is a non-empty folder that lorakit did not write; lorakit never "
                              "removes it (choose a new or empty folder)")
        if not overwrite:
            raise OutputError(f"{flag} {out} already exists (written by lorakit); pass --overwrite to replace it")
    return out


def check_add_dir(out: str | os.PathLike, flag: str = "--out", inputs: Iterable = ()) -> Path:
    """Check that lorakit may add files to folder ``out`` (new, empty or marked) and that it is writable."""
    out = Path(out)
    check_not_input(out, inputs, flag)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a folder")
    if out.is_dir() and _nonempty(out) and not is_marked(out):
        raise OutputError(f"{flag} {out} is a non-empty folder that lorakit did not write; choose a new or empty "
                          "folder (lorakit never writes among files it did not create)")
    check_writable(out, flag)
    return out


def check_writable(out: Path, flag: str = "--out") -> None:
    """Fail now, not after hours of work, if ``out`` (or the first existing folder above it) is not writable."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: the folder {probe} is not writable")


def claim_dir(out: str | os.PathLike, kind: str, flag: str = "--out", inputs: Iterable = ()) -> Path:
    """:func:`check_add_dir`, then create ``out`` if needed and mark it. Returns the folder."""
    out = check_add_dir(out, flag, inputs)
    out.mkdir(parents=True, exist_ok=True)
    if not is_marked(out):
        write_marker(out, kind)
    return out


def check_out_file(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out",
                   inputs: Iterable = (), overwrite_flag: str | None = "--overwrite") -> Path:
    """Check that file ``out`` may be written (see the module rules). Returns it as a Path.

    ``overwrite_flag``: how the caller's user allows replacing (None: the command never replaces a file)."""
    out = Path(out)
    check_not_input(out, inputs, flag)
    if out.is_dir():
        raise OutputError(f"{flag} {out} is a folder; give a file path")
    if out.exists():
        if not overwrite:
            hint = f"pass {overwrite_flag} to replace it" if overwrite_flag else "choose another path"
            raise OutputError(f"{flag} {out} already exists; {hint}")
        if not lorakit_wrote_file(out):
            raise OutputError(f"{flag} {out} exists and was not written by lorakit; lorakit never overwrites it")
    check_writable(out.parent, flag)
    return out


def clean_stale(parent: Path, name: str, max_age: float = STALE_SECONDS) -> None:
    """Remove temp files/folders that a killed lorakit writer left beside ``parent/name`` (older than
    ``max_age`` seconds, so a writer still running is never disturbed)."""
    if not parent.is_dir():
        return
    now = time.time()
    for p in parent.glob(f".{glob.escape(name)}.*"):
        if not (p.name.endswith(".tmp") or p.name.endswith(_TMP_SUFFIX) or p.name.endswith(_OLD_SUFFIX)):
            continue
        try:
            if now - p.lstat().st_mtime < max_age:
                continue
            if p.is_dir() and not p.is_symlink():
                if is_marked(p) or not _nonempty(p):
                    shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False when the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(out: str | os.PathLike, build: Callable[[Path], None], kind: str, overwrite: bool = False,
                flag: str = "--out", inputs: Iterable = ()) -> Path:
    """Write folder ``out`` atomically: ``build(tmp)`` fills a temp folder beside it, the marker is added, and the
    complete folder takes ``out``'s place; an old ``out`` (allowed by :func:`check_replace_dir`) is removed last.
    Returns ``out``."""
    out = check_replace_dir(out, overwrite, flag, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out.parent, flag)
    clean_stale(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=_TMP_SUFFIX, dir=out.parent))
    try:
        build(tmp)
        write_marker(tmp, kind)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the permissions mkdir would
        if out.is_dir():
            if _exchange(tmp, out):
                shutil.rmtree(tmp)  # now the old folder
                return out
            if not _nonempty(out):
                out.rmdir()
                tmp.rename(out)
                return out
            # No atomic swap here: for a moment only the old folder's hidden name exists (clean_stale removes it
            # if killed right then; it carries the marker, so it is lorakit's).
            old = out.with_name(f".{out.name}.{os.getpid()}-{time.time_ns()}{_OLD_SUFFIX}")
            os.rename(out, old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["MARKER", "OutputError", "check_not_input", "is_marked", "lorakit_wrote_file", "write_marker",
           "check_replace_dir", "check_add_dir", "check_writable", "claim_dir", "check_out_file", "clean_stale",
           "replace_dir"]
