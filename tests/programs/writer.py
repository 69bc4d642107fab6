"""A second job writing one save path: saves COUNT steps from FIRST, or reports the refusal.

python tests/programs/writer.py DIRECTORY FIRST COUNT
"""

from __future__ import annotations

import json
import sys

import numpy as np

import shardsave
from shardsave.errors import ConcurrentSaveError


def main() -> None:
    directory, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    saver = shardsave.Saver(max_to_keep=2)
    try:
        for step in range(first, first + count):
            saver.save({"w": np.full(50_000, step, np.float32)}, directory + "/model", global_step=step)
        saver.wait_until_finished()
        print(json.dumps({"saved": count}))
    except ConcurrentSaveError as e:
        print(json.dumps({"refused": str(e)}))


if __name__ == "__main__":
    main()
