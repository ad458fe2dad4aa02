"""The pieces of tools/gpu_check.py: preflight, embedded tables, timing, and the sections.

A section is a function `(Context) -> list[Row]` registered once in `sections.SECTIONS` with the
preflight items it needs; a section whose needs are missing gives one skipped row with the reason.
"""
