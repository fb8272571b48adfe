"""The output folder: atomic files, the image cache, the journal and results.json."""
