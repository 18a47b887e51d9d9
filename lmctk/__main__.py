"""`python -m lmctk` runs the command line."""
import sys

from lmctk.cli import main

sys.exit(main())
