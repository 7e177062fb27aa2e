import sys

from phiforge.cli import run_main
from phiforge.serve import main

raise SystemExit(run_main(main, sys.argv[1:]))
