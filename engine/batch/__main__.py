"""`python -m engine.batch MANIFEST --out-dir DIR ...`: the batch command on its own."""
import sys

from engine.batch.cli import main

sys.exit(main())
