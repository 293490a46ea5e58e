"""A reward module whose import kills the process: a rollout worker that dies while starting, a fault
(not the user's error), for tests/test_fail_fast.py. Only rollout workers import it."""

import os
import sys

print("crashes_on_import: segmentation fault in the scoring library (simulated)", file=sys.stderr)
os._exit(139)


def score(prompts, responses):  # never reached
    return [0.0] * len(prompts)
