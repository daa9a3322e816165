"""Benchmarks of a trained model (`task=eval`): the XGen-7B report's Section 5, one module per
benchmark kind (the map is `xgen.tasks.eval.BENCHMARKS`), sharing `xgen.eval.common`."""
