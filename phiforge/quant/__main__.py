import sys

from phiforge.cli import run_main
from phiforge.quant import main

raise SystemExit(run_main(main, sys.argv[1:]))
