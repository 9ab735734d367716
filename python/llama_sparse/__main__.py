"""`python -m llama_sparse` is the `llama-sparse` command."""

import sys

from .cli import main

sys.exit(main())
