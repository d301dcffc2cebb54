"""`python -m speechllm.serve ARGS` is `speechllm serve ARGS`."""

import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
