"""Path -> object wiring for every command, one module per command: load the model, vectors and data files a
command names, check every argument before the model loads (by building the library's own value objects where
one exists), call the library, and write the outputs. The CLI (``steerlib.cli``) parses arguments and calls
exactly one function here; policies (which layer by default, which judge, what gets written where) live here
or below, never in the CLI.

Each command loads its model through ``steerlib.core.models.load_model`` looked up at call time, so a test can
stand in for the model in one place.
"""
