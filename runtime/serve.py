"""``python -m conveyor.runtime.serve ...``: the entrypoint InferenceServices name; the server itself is
``conveyor.runtime.serving.server``."""

import sys

from conveyor.runtime.serving.server import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
