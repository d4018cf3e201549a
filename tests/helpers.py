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

# Issue 3's challenge table, written out independently of ex2l_xai.data.challenges, so the tests check the
# package against the issue: {challenge: (train group g, test t, O2O filler)}.
CLASSES = ["bulldog", "dachshund", "labrador", "corgi"]
BGS = ["desert", "jungle", "dirt", "mountain", "snow", "beach"]

TABLE = {
    "o2o_easy": (["desert", "jungle", "dirt", "snow"], ["dirt", "snow", "desert", "jungle"], "beach"),
    "o2o_medium": (["mountain", "beach", "dirt", "jungle"], ["jungle", "dirt", "beach", "snow"], "desert"),
    "o2o_hard": (["jungle", "mountain", "snow", "desert"], ["mountain", "snow", "desert", "jungle"], "beach"),
    "m2m_easy": (["desert", "mountain", "dirt", "jungle"], ["dirt", "jungle", "mountain", "desert"], None),
    "m2m_medium": (["beach", "snow", "mountain", "desert"], ["desert", "mountain", "beach", "snow"], None),
    "m2m_hard": (["dirt", "jungle", "snow", "beach"], ["snow", "beach", "dirt", "jungle"], None),
}
