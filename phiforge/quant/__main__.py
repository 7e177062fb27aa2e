import sys

from phiforge.quant.cli import main
from phiforge.utils import run_main

raise SystemExit(run_main(main, sys.argv[1:]))
