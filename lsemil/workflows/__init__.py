"""What the commands do, as library functions: `evaluation`, `prediction`, `reproduction`,
`demonstration` (the whole method on synthetic data), `lanes` (training runs side by side).
"""
