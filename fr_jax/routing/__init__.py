"""The method's parts (method.md): the router (backbone, routing head, complementary logits;
router.py), the stacked experts (experts.py) and the one fusion rule with its decode modes
(fusion.py); and sequence-level routing's model side, the SharedTrunkNet (trunk.py) and the
per-prompt selector of mode `sequence` (selector.py)."""
