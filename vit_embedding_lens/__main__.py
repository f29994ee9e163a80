"""``python -m vit_embedding_lens ...`` is the ``vit-lens`` command (and what ``torchrun -m``
runs)."""

import sys

from vit_embedding_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
