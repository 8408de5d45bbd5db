"""fasttin's benchmarks: every stage of the pipeline measured side by side (python -m benchmarks.run),
the loaders users would otherwise choose (its peers stage, benchmarks/peers/), and the checks of
what a run does."""

LOADERS = ("resident", "pil", "dali", "classic")  # the loaders of the loader and train stages
