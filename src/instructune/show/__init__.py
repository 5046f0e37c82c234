"""Showing encoded rows to people: which tokens are trained, in the terminal, as HTML and as JSONL.

`tokens` turns an `EncodedRow` into per-token views; `terminal` and `html` render any such views
(also ones coloured by something else, such as a per-token loss); `summary` renders a
`PreparationReport`; `jsonl` writes rows exactly as training uses them.
"""
