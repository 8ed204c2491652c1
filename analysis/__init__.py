"""analysis: trial results (RUN_DIR/trials/*/result.json) -> comparison tables, plots and one report."""
