"""Print the shell commands of the README walkthrough as one script.

The walkthrough is every ```sh block between the markers
``<!-- walkthrough:start -->`` and ``<!-- walkthrough:end -->``. The demo runs
them and a test runs them, so the README cannot drift from what works.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

START = "<!-- walkthrough:start -->"
END = "<!-- walkthrough:end -->"
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)


def extract(markdown: str) -> str:
    """The walkthrough's shell blocks, in order, joined into one script."""
    if START not in markdown or END not in markdown:
        raise SystemExit("walkthrough markers not found")
    section = markdown.split(START, 1)[1].split(END, 1)[0]
    blocks = BLOCK.findall(section)
    if not blocks:
        raise SystemExit("no ```sh blocks in the walkthrough")
    return "\n".join(blocks)


if __name__ == "__main__":
    sys.stdout.write(extract(Path(sys.argv[1]).read_text(encoding="utf-8")))
