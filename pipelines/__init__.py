"""Entry points that wire giblet together: the CLI, the stages, the Dask engine,
and the thin train loop. Imports ``giblet``; ``giblet`` never imports this package."""
