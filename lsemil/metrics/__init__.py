"""Scores as plain numbers (host-side numpy, no JAX); formatting them is `lsemil.reporting`.

`classification` (AUC and its bootstrap), `overlap` (boxes, masks, DICE, IoBB), `localization`
(the weak-localization protocols), `baselines` (the constant map, the centre prior),
`significance` (DeLong and bootstrap tests), `calibration` (ECE, Brier, recalibration).
"""
