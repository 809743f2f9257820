"""The reference figures the suite reproduces, stated once: tests import them from here instead of repeating them.

``docs/reference.md`` states the same figures for readers. Where they come from:

- the public YOLOv5 architecture (v6.0 and later: its blocks, layer table and n/s/m/l/x scaling) for the base
  models;
- the paper, *Slim-neck by GSConv* (Li et al., J. Real-Time Image Processing 21:62, 2024; arXiv 2206.02424), and
  its public reference repository (the GSConv / GSBottleneck / VoVGSCSP code and its "slimneck" YOLOv5 config) for
  the slim-neck models: the four neck Conv layers (10, 14, 18, 21) become GSConv, the four neck C3 layers (13, 17,
  20, 23) VoVGSCSP; "GSConv-only" swaps the four Conv layers alone (the paper's ablation).

Every count was measured by building those public structures, not copied from a table: 80 classes, input
1×3×640×640, eval mode, BatchNorm not fused. Params: every parameter, buffers excluded. FLOPs: as
``torch.utils.flop_counter.FlopCounterMode`` counts them (2 × the multiply-accumulates of convolutions and matrix
products; BatchNorm, activations, pooling, upsampling and element-wise ops count zero).
"""

import hashlib

import torch

# (params, FLOPs) of YOLOv5 n/s/m/l/x as the public architecture builds them.
BASE = {
    "yolov5n": (1_872_157, 4_468_121_600),
    "yolov5s": (7_235_389, 16_433_561_600),
    "yolov5m": (21_190_557, 48_872_448_000),
    "yolov5l": (46_563_709, 108_993_740_800),
    "yolov5x": (86_749_405, 205_448_192_000),
}
# (params, FLOPs) with the reference repository's GSConv in the four neck Conv layers, C3 kept.
GSCONV_ONLY = {
    "yolov5n": (1_764_317, 4_331_622_400),
    "yolov5s": (6_794_429, 15_872_204_800),
    "yolov5m": (20_191_197, 47_597_875_200),
    "yolov5l": (44_780_669, 106_717_593_600),
    "yolov5x": (83_957_405, 201_882_112_000),
}
# (params, FLOPs) of the reference repository's slim-neck YOLOv5: GSConv and VoVGSCSP in the neck.
SLIM_NECK = {
    "yolov5n": (1_669_693, 4_144_947_200),
    "yolov5s": (6_400_381, 15_079_424_000),
    "yolov5m": (18_394_653, 43_961_241_600),
    "yolov5l": (39_958_781, 96_927_744_000),
    "yolov5x": (73_872_925, 181_371_392_000),
}
# The same, by the name of the built-in rule set that reproduces each ("base": no rewrite).
BY_RULE_SET = {"base": BASE, "gsconv-only": GSCONV_ONLY, "slim-neck": SLIM_NECK}

# (number of keys, signature) of the state dicts, buffers included; see state_dict_signature. A model whose
# signature matches loads the public checkpoints (base) or the GS block names of the reference code (slim-neck,
# without the reference VoVGSCSP's unused ``res`` conv) by key.
BASE_STATE_DICTS = {
    "yolov5n": (349, "97130ea2f1c4481c"),
    "yolov5s": (349, "8c5e27a536324138"),
    "yolov5l": (613, "7322f2ebef4b2790"),
}
SLIM_NECK_STATE_DICTS = {
    "yolov5n": (445, "e7e2a8bb2002dd8e"),
    "yolov5s": (445, "1a307c32d66e154c"),
    "yolov5l": (853, "29213b68ff1fb4e8"),
}
# A few of those keys and their shapes, YOLOv5-L: a checkpoint's names and the GS blocks' depthwise 5×5 conv.
YOLOV5L_SHAPES = {"model.0.conv.weight": (64, 3, 6, 6), "model.24.m.2.weight": (255, 1024, 1, 1)}
SLIM_NECK_YOLOV5L_SHAPES = {
    "model.10.cv2.conv.weight": (256, 1, 5, 5),
    "model.13.gsb.0.conv_lighting.0.cv1.conv.weight": (128, 256, 1, 1),
}


def state_dict_signature(model: torch.nn.Module) -> str:
    """The first 16 hex digits of sha256 over one ``key shape`` line per state-dict entry, sorted by key."""
    text = "\n".join(f"{key} {tuple(t.shape)}" for key, t in sorted(model.state_dict().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
