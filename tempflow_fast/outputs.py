"""Output files a command writes at the end of its work: checked before the work starts, written atomically.

A command that evaluates for minutes and then finds it cannot write its `--json` (a folder in its place, a
read-only or missing location, an image suffix PIL cannot write) loses all of it; `check_output_file` refuses such
a path first, in one line naming the flag. `write_text_atomic` writes to a temporary sibling and renames it into
place, so an interrupted write never leaves half a file where a finished one was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence


def check_output_file(path, flag: str, suffixes: Optional[Sequence[str]] = None) -> Path:
    """`path` as a Path once it is known to be writable (its folder is made); ValueError naming `flag` if not.

    suffixes: the allowed file suffixes (lower case, with the dot), or None for any.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{flag} must be a file path, got {path!r}")
    out = Path(path)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        shown = [s for s in (".png", ".jpg", ".webp") if s in suffixes] or list(suffixes)[:3]
        more = ", ..." if len(suffixes) > len(shown) else ""
        raise ValueError(f"{flag} {str(out)!r}: the file name must end in a suffix it can be written as "
                         f"({', '.join(shown)}{more}), got {out.suffix or 'none'!r}")
    if out.is_dir():
        raise ValueError(f"{flag} {str(out)!r} is a folder; give a file path")
    probe = out.parent / f".{out.name}.{os.getpid()}.probe"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "x"):
            pass
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{flag} {str(out)!r}: cannot write there ({err.strerror or err})") from None
    return out


def check_output_arg(parser, path, flag: str) -> None:
    """`check_output_file` for an argparse flag: a bad path ends the script through `parser.error` (exit 2)."""
    if path:
        try:
            check_output_file(path, flag)
        except ValueError as err:
            parser.error(str(err))


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling renamed into place."""
    out = Path(path)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out)


def image_suffixes() -> tuple:
    """The file suffixes PIL can write an image to (".png", ".jpg", ...)."""
    from PIL import Image

    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE))
