import sys

from llama_jax.scaling.cli import main

sys.exit(main())
