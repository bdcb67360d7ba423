"""The method's parts (method.md): the router (backbone, routing head, complementary logits;
router.py), the stacked experts (experts.py), the one fusion rule (fusion.py) and the decode
modes as policies built on it (modes.py); and sequence-level routing's model side, the
SharedTrunkNet (trunk.py) and the per-prompt selector of mode `sequence` (selector.py)."""
