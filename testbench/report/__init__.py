"""Report writers: per-case artifacts, SVG memory maps."""
