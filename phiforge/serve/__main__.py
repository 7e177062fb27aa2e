import sys

from phiforge.utils import run_main
from phiforge.serve import main

raise SystemExit(run_main(main, sys.argv[1:]))
