"""Shared constants of the test suite: the tiny training configuration and the PNG signature."""

# A 1-epoch run on the tiny synthetic benchmark: seconds on a CPU (used with load_config("quick", TINY)).
TINY = [
    "data.options.image_size=32",
    "data.options.per_group=8",
    "data.options.test_per_group=8",
    "data.batch_size=16",
    "model.width=8",
    "train.epochs=1",
    "train.device=cpu",
]
PNG = b"\x89PNG\r\n\x1a\n"
