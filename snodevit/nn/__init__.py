"""The model's parts, one concern per file, that never import the model built from them: attention backends, the
TimeNet, the SDE block and its solvers."""
