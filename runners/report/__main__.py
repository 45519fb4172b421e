"""`python -m runners.report`: the command (runners/report/cli.py)."""
import sys

from runners.report.cli import main

sys.exit(main())
