"""Spawrious's six challenges: which class sits on which background in which environment.

The table follows the Spawrious reference code (``build_combination`` in ``spawrious/torch.py``):

- M2M with training backgrounds ``g = [g0, g1, g2, g3]``: env 1 bulldog→g0, dachshund→g1, labrador→g2,
  corgi→g3; env 2 bulldog→g1, dachshund→g0, labrador→g3, corgi→g2; test ``t``: bulldog→t0+t1, dachshund→t1+t0,
  labrador→t2+t3, corgi→t3+t2.
- O2O: both training environments put class ``i`` on ``g_i``, 97 % of a class's images in env 1 (87 % in env
  2), the rest on the filler background; test puts class ``i`` on ``t_i``.

Both the built-in ``synthetic`` benchmark and the ``spawrious`` loader read the same :class:`Cell` plans, so
the two agree on every (label, background, environment) count.
"""

from __future__ import annotations

from dataclasses import dataclass

from ex2l_xai.errors import DataError

CLASSES: tuple[str, ...] = ("bulldog", "dachshund", "labrador", "corgi")
"""Label order (label id = position), as in the Spawrious reference code."""

BACKGROUNDS: tuple[str, ...] = ("desert", "jungle", "dirt", "mountain", "snow", "beach")
"""Fixed global background order: confounder id = position."""

ENV_NAMES: tuple[str, ...] = ("train_env1", "train_env2", "test")
"""Environment ids: 0 = training env 1, 1 = training env 2, 2 = test."""

REFERENCE_TOTAL = 3168
"""Images per class and training environment in the released Spawrious benchmark."""

O2O_FRACTIONS: tuple[float, float] = (0.97, 0.87)
"""Share of a class's O2O training images on its own background in env 1 and env 2."""

TEST_ENV = 2


@dataclass(frozen=True)
class Challenge:
    """One Spawrious challenge.

    Attributes
    ----------
    name : str
        ``o2o_easy`` ... ``m2m_hard``.
    train_backgrounds : tuple of str
        The group ``g`` (four backgrounds).
    test_backgrounds : tuple of str
        The test backgrounds ``t`` (four backgrounds).
    filler : str or None
        O2O filler background; None for M2M.
    """

    name: str
    train_backgrounds: tuple[str, str, str, str]
    test_backgrounds: tuple[str, str, str, str]
    filler: str | None = None

    @property
    def kind(self) -> str:
        """``"o2o"`` or ``"m2m"``."""
        return self.name.split("_")[0]


CHALLENGES: dict[str, Challenge] = {
    "o2o_easy": Challenge(
        "o2o_easy", ("desert", "jungle", "dirt", "snow"), ("dirt", "snow", "desert", "jungle"), "beach"
    ),
    "o2o_medium": Challenge(
        "o2o_medium", ("mountain", "beach", "dirt", "jungle"), ("jungle", "dirt", "beach", "snow"), "desert"
    ),
    "o2o_hard": Challenge(
        "o2o_hard",
        ("jungle", "mountain", "snow", "desert"),
        ("mountain", "snow", "desert", "jungle"),
        "beach",
    ),
    "m2m_easy": Challenge(
        "m2m_easy", ("desert", "mountain", "dirt", "jungle"), ("dirt", "jungle", "mountain", "desert")
    ),
    "m2m_medium": Challenge(
        "m2m_medium", ("beach", "snow", "mountain", "desert"), ("desert", "mountain", "beach", "snow")
    ),
    "m2m_hard": Challenge(
        "m2m_hard", ("dirt", "jungle", "snow", "beach"), ("snow", "beach", "dirt", "jungle")
    ),
}


@dataclass(frozen=True)
class Cell:
    """A block of images: ``count`` images of class ``label`` on background ``confounder`` in ``env``.

    ``folder`` is the Spawrious sub-folder (``0`` or ``1``) the images are read from.
    """

    label: int
    confounder: int
    env: int
    count: int
    folder: int = 0


def get_challenge(name: str) -> Challenge:
    """Return the challenge called ``name``.

    Raises
    ------
    DataError
        If ``name`` is not one of the six challenges.
    """
    try:
        return CHALLENGES[str(name).lower()]
    except KeyError:
        raise DataError(f"unknown challenge {name!r}; expected one of {', '.join(CHALLENGES)}") from None


def o2o_counts(total: int) -> tuple[int, int]:
    """Images of a class on its own background in O2O env 1 and env 2 (the rest go to the filler).

    Same formula as the reference code: ``int(0.97 * total)``, ``int(0.87 * total)``; ``total = 3168`` gives
    3072 and 2756 (fillers 96 and 412).
    """
    return int(O2O_FRACTIONS[0] * total), int(O2O_FRACTIONS[1] * total)


def train_background(challenge: Challenge, label: int, env: int) -> str:
    """Majority background of class ``label`` in training environment ``env`` (0 or 1)."""
    g = challenge.train_backgrounds
    if challenge.kind == "m2m" and env == 1:
        return g[label ^ 1]  # bulldog<->dachshund, labrador<->corgi swap their backgrounds in env 2
    return g[label]


def minority_backgrounds(challenge: Challenge, label: int, env: int) -> list[str]:
    """Backgrounds that minority images of class ``label`` take in training environment ``env``.

    M2M: classes pair up as {bulldog, dachshund} and {labrador, corgi}; a class's minority images go onto the
    other pair's backgrounds in that environment. O2O: onto the other three classes' backgrounds.
    """
    if challenge.kind == "m2m":
        others = [2, 3] if label < 2 else [0, 1]
    else:
        others = [j for j in range(len(CLASSES)) if j != label]
    return [train_background(challenge, j, env) for j in others]


def split_evenly(n: int, k: int) -> list[int]:
    """Split ``n`` items into ``k`` parts that differ by at most one (the first parts get the extra items)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def train_plan(challenge: Challenge, total: int, minority_fraction: float = 0.0) -> list[Cell]:
    """Training cells of ``challenge`` with ``total`` images per class and training environment.

    Parameters
    ----------
    challenge : Challenge
        The challenge.
    total : int
        Images per class and environment (3168 in the released benchmark).
    minority_fraction : float
        Share of each class's images (``round(minority_fraction * total)`` per class and environment) moved
        off the class's majority background onto :func:`minority_backgrounds`, split as evenly as possible
        (in class order). 0 gives Spawrious's exact table.

    Returns
    -------
    list of Cell
        Ordered by environment, then class, then background (majority, filler, minority backgrounds).
    """
    if not 0.0 <= minority_fraction < 1.0:
        raise DataError(f"minority_fraction={minority_fraction!r}; expected a number in [0, 1)")
    bg = BACKGROUNDS.index
    n_min = int(minority_fraction * total + 0.5)
    cells: list[Cell] = []
    for env in (0, 1):
        for label in range(len(CLASSES)):
            if challenge.kind == "o2o":
                main = o2o_counts(total)[env]
                filler = total - main
            else:
                main, filler = total, 0
            if n_min > main:
                raise DataError(
                    f"minority_fraction={minority_fraction} moves {n_min} images per class, more than the "
                    f"{main} on the majority background of {challenge.name} env {env + 1}; expected a "
                    "smaller fraction"
                )
            counts = {train_background(challenge, label, env): main - n_min}
            if filler:
                counts[challenge.filler] = counts.get(challenge.filler, 0) + filler
            others = minority_backgrounds(challenge, label, env)
            for b, n in zip(others, split_evenly(n_min, len(others)), strict=True):
                counts[b] = counts.get(b, 0) + n
            cells += [
                Cell(label, bg(b), env, n, folder=env if challenge.kind == "o2o" else 0)
                for b, n in counts.items()
                if n > 0
            ]
    return cells


def test_sources(challenge: Challenge) -> dict[int, list[tuple[int, str]]]:
    """Where each class's test images come from: ``label -> [(folder, background), ...]``.

    O2O reads class ``i`` on ``t_i`` from folders 0 and 1; M2M reads folder 0 on two backgrounds.
    """
    t = challenge.test_backgrounds
    if challenge.kind == "o2o":
        return {i: [(0, t[i]), (1, t[i])] for i in range(len(CLASSES))}
    pair = {0: (0, 1), 1: (1, 0), 2: (2, 3), 3: (3, 2)}
    return {i: [(0, t[a]), (0, t[b])] for i, (a, b) in pair.items()}


def test_plan(challenge: Challenge, per_class: int) -> list[Cell]:
    """Test cells with ``per_class`` images per class, split evenly over the class's test backgrounds.

    M2M classes get ``ceil(per_class / 2)`` images on their first test background and the rest on the second.
    """
    cells: list[Cell] = []
    for label, sources in test_sources(challenge).items():
        backgrounds = list(dict.fromkeys(b for _, b in sources))
        for b, n in zip(backgrounds, split_evenly(per_class, len(backgrounds)), strict=True):
            if n > 0:
                cells.append(Cell(label, BACKGROUNDS.index(b), TEST_ENV, n))
    return cells


def group_table(
    challenge: Challenge, total: int, test_per_class: int, minority_fraction: float = 0.0
) -> list[dict[str, object]]:
    """Rows ``{class, env, background, count}`` of the whole challenge, for documentation."""
    rows: list[dict[str, object]] = []
    for c in train_plan(challenge, total, minority_fraction) + test_plan(challenge, test_per_class):
        rows.append(
            {
                "class": CLASSES[c.label],
                "env": ENV_NAMES[c.env],
                "background": BACKGROUNDS[c.confounder],
                "count": c.count,
            }
        )
    return rows
