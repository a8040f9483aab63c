"""Recipes: the strict pydantic sections (`sections.py`), reading YAML with `--set`
overrides and cross-field checks (`load.py`), and the JSON Schema and README reference."""
