"""The networks (flax.linen): the multi-resolution MIL model of Sec 3 and its baseline.

`pooling` (LSE-LBA and the other MIL poolings), `layers`, `mil` (`MultiResolutionMIL`),
`gap_classifier` (the single-resolution GAP baseline), `posthoc` (its CAM / Grad-CAM maps),
`registry` (which model a config builds).
"""
