import sys

from src.bench import main

sys.exit(main())
