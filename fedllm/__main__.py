"""`python -m fedllm ...`: the same as the `fedllm` command."""

import sys

from fedllm.cli import main

sys.exit(main())
