"""Event files read back with TensorBoard's own reader (its event-processing module, what
`tensorboard --logdir` serves from), not with tensorboardX, which wrote them."""

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util


def read_events(folder) -> dict:
    """{"scalars": {tag: [(step, value)]}, "histograms": {tag: [step]}, "text": {tag:
    [(step, text)]}} of one run folder, every event kept."""
    acc = ea.EventAccumulator(str(folder), size_guidance={
        ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    text = {}
    for tag in tags["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "text":
            text[tag.split("/text_summary")[0]] = [
                (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
                for e in acc.Tensors(tag)]
    return {"scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
            "histograms": {t: [e.step for e in acc.Histograms(t)] for t in tags["histograms"]},
            "text": text}
