"""`python -m lmserve.cli`: the same as `lmserve` / `python -m lmserve`."""
import sys

from lmserve.cli import main

sys.exit(main())
