"""The export <-> serving contract of an artifact's files and graph signatures (numpy-free,
torch-free): the exporter writes exactly these, the runtime checks and feeds exactly these.

    state.onnx   item, category, action, ts (N,) int64      -> S (H,F,D), z (H,F), m (H,), t_ref ()
    scorer.onnx  S, z, m, n, item, category, mask (B,M)     -> logits (B,M)
    items.npz    item_id, category: the item side-feature table
"""

from __future__ import annotations

from typing import Final

STATE_FILE: Final = "state.onnx"
SCORER_FILE: Final = "scorer.onnx"
ITEMS_FILE: Final = "items.npz"

STATE_INPUTS: Final = ("item", "category", "action", "ts")
STATE_OUTPUTS: Final = ("S", "z", "m", "t_ref")
SCORER_INPUTS: Final = ("S", "z", "m", "n", "item", "category", "mask")
SCORER_OUTPUTS: Final = ("logits",)
