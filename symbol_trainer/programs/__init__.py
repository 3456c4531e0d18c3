"""The three programs, each a main(argv=None) -> int: build_binary_classifier,
build_multi_hot_model and predict. The top-level scripts of a checkout and the console
commands of an installed copy (pyproject.toml) both call them."""
