"""The paper's baselines, run through the same data, decode and evaluation paths as
FusionRoute: sequence-level routing on prefill activations (SharedTrunkNet, `seqroute`),
model merging (`merge`) and direct fine-tuning (train stage `lm`)."""
