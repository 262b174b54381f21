"""lsemil: multi-resolution multi-instance learning with LSE-LBA pooling.

A JAX/Flax reimplementation of Yao et al. 2018, "Weakly Supervised Medical
Diagnosis and Localization from Multiple Resolutions".
"""

__version__ = "0.1.0"
