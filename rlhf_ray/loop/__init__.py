"""`rlhf-ray loop`: the feedback cycle as one command (run.py), its rounds (round.py) and versions (versions.py)."""
