"""`python -m speechllm.cli ARGS` is `speechllm ARGS` (for `accelerate launch -m speechllm.cli`)."""

import sys

from . import main

sys.exit(main())
