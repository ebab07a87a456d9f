"""Print a variable of the project Makefile as pip requirements, one per line.

The Makefile's PINS and MODEL_PKGS are the single list of pinned versions; the image build
(infra/docker/Dockerfile) reads them with this script instead of repeating them, so `make install`
and `docker build` install the same versions. Standard library only: it runs in the base image
before anything is installed.

    python makefile_vars.py Makefile PINS > pins.txt
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|=)\s*(.*)$")


def makefile_vars(text: str) -> dict[str, str]:
    """Plain `NAME := value` assignments (backslash continuations joined), as raw strings."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    out: dict[str, str] = {}
    for line in logical:
        if line.startswith(("\t", "#", "export ")):
            continue
        m = _ASSIGN.match(line)
        if m:
            out[m.group(1)] = m.group(2).split("#", 1)[0].strip()
    return out


def requirements(makefile: Path, name: str) -> list[str]:
    """The words of Makefile variable `name`, shell quotes removed, as make's recipe sees them."""
    values = makefile_vars(makefile.read_text())
    if name not in values:
        raise SystemExit(f"{makefile}: no variable {name!r} (have: {', '.join(sorted(values))})")
    words = shlex.split(values[name])
    if not words or any("$" in w for w in words):
        raise SystemExit(f"{makefile}: {name} is empty or uses make expansions: {values[name]!r}")
    return words


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(argv[0]), argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
