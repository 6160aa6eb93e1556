"""The commands that sit above the training scripts (``python -m common.tools.<name>``): evaluate and export a
checkpoint, draw the papers' figures, run a results table and its baselines, time the scripts. They import the
core modules of ``common`` and the scripts; nothing in the core imports them."""
