"""What the stability benchmark's tables cannot say on their own: why the defaults lose where
they lose, each with the measurement behind it. Copied into docs/stability.md after the answers;
:func:`gradguard.app.lab.stability.render` writes the page again when this changes."""

NOTES = """
(notes to come)
"""
