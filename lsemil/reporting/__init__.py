"""Results made readable: every table and figure of the paper is formatted here.

`paper_tables` (Tables 1-4 as Markdown / CSV), `drawing` (Figures 1 and 3, overlays), `plots`
(ROC curves, reliability diagrams, thumbnails), `html_page` (the self-contained HTML report).
"""
