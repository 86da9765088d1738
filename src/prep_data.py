"""`python -m src.prep_data`: IBL insertions through ONE into session files (src/ibl/prep.py)."""

import sys

from src.ibl.prep import main

if __name__ == "__main__":
    sys.exit(main())
