"""docs/flags.md lists every flag the parser has (regenerate: python -m lmserve.cli.flags_doc > docs/flags.md)."""
from __future__ import annotations

import os

from lmserve.cli import flags_doc

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")


def test_every_flag_is_on_the_flags_page():
    with open(DOC) as f:
        page = f.read()
    missing = [line.split("|")[1].strip() for line in flags_doc.render().splitlines()
               if line.startswith("| `") and line.split("|")[1].strip() not in page]
    assert not missing, f"not in docs/flags.md (regenerate it): {missing}"
