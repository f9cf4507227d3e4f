"""The full-pipeline benchmark (also ``pipeline bench``): the four context modes side by side,
behind a latency proxy, against the database's own limit. The code, and what it measures and
why, is in pipeline/bench/.

    .venv/bin/python scripts/bench.py
    .venv/bin/python scripts/bench.py --delay-ms 0 --json /tmp/bench.json
    .venv/bin/python scripts/bench.py --help
"""

import sys

from pipeline.bench import main

if __name__ == "__main__":
    sys.exit(main())
