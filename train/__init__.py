"""charlm's trainer: `python -m train` (training), `python -m train.evaluate`, `python -m train.sample`."""
