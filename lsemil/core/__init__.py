"""The bottom layer: what every other package needs, nothing of the paper's method.

`errors` (the one-line user errors), `fileio` (local or gs:// files, written atomically),
`tables` (Markdown and CSV writers), `configuration` (loading `configs/*.py` files).
"""
