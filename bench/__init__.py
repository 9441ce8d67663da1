"""charlm's benchmarks (pytest-benchmark: `pytest bench`) and the measurements behind its presets."""
