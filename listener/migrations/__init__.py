"""SQL migrations, applied in file-name order. `reference/` is the app schema stand-in."""
