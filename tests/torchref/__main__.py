"""``python -m torchref '<json jobs>' WORLD_SIZE`` (from ``tests/``): print a run's records as JSON.

Example: ``cd tests && python -m torchref '{"a": {"scenario": "tp", "sp": true}}' 2``.
Handy to eyeball what torch issues for a config before writing a comparison test.
"""

from __future__ import annotations

import json
import sys

from .world import run_world


def main(argv: list[str]) -> int:
    """Parse ``jobs_json world_size`` and print ``run_world``'s result (sorted keys) on stdout."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    result = run_world(json.loads(argv[0]), int(argv[1]))
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
