"""Sequence-level routing's model side: the SharedTrunkNet (trunk.py) and the decode-time
selector built on it (selector.py)."""
