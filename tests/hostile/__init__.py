"""A corpus of hostile inputs (issue 8, item 3): bad configs as files in `configs/`, and builders in
`corpus.py` for what cannot be a static file (images, symlinks, datasets with a valid manifest over bad
rows). `tests/test_hostile_inputs.py` drives every case through the real `tgrl` command line."""
