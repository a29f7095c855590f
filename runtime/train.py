"""``python -m conveyor.runtime.train --config run.json``: the entrypoint RayJobs name; the run itself is
``conveyor.runtime.training.run``."""

import sys

from conveyor.runtime.training.run import main

if __name__ == "__main__":
    sys.exit(main())
