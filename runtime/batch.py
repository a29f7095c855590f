"""``python -m conveyor.runtime.batch --config run.json``: the entrypoint a BatchPrediction's RayJob
names; the run itself is ``conveyor.runtime.scoring.run``."""

import sys

from conveyor.runtime.scoring.run import main

if __name__ == "__main__":
    sys.exit(main())
