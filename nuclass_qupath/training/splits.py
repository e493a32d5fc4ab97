"""Training, validation and test splits by group (slide or cohort), never by cell.

Cells of one slide share its stain, scanner and patient, so a split that puts
cells of one slide on both sides overstates accuracy. Splitting by cohort
goes further: a held-out cohort measures how the model does on a site it has
never seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)


@dataclass
class GroupSplit:
    """Names of the groups in each part of a split; every group is in exactly one part."""

    train: list[str]
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def masks(self, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return boolean masks of the cells in the training, validation and test groups."""
        groups = np.asarray(groups, dtype=object)
        return (np.isin(groups, self.train), np.isin(groups, self.val), np.isin(groups, self.test))

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def _check_known(requested: list[str], known: list[str], what: str, option: str) -> None:
    missing = sorted(set(requested) - set(known))
    if missing:
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        raise CellsError(f"{option}: {what} {missing} not found; the {what}s are: {shown}")


def split_groups(
    groups: np.ndarray | list[str],
    *,
    val_groups: list[str] | None = None,
    test_groups: list[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    what: str = "slide",
) -> GroupSplit:
    """Split the distinct ``groups`` into training, validation and test groups.

    ``test_groups`` are held out entirely. Validation takes ``val_groups``,
    or else ``round(val_fraction * n)`` (at least one) of the remaining groups
    drawn with ``seed``; ``val_fraction`` 0 means no validation. ``what`` names
    the groups in messages (``slide`` or ``cohort``).

    Raises
    ------
    CellsError
        If a named group does not exist, is named for both validation and
        test, or no training group is left.
    """
    if not 0 <= val_fraction < 1:
        raise CellsError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    known = sorted({str(g) for g in np.asarray(groups, dtype=object).tolist()})
    test = sorted(set(test_groups or []))
    _check_known(test, known, what, "--test-groups")
    if val_groups:
        val = sorted(set(val_groups))
        _check_known(val, known, what, "--val-groups")
        both = sorted(set(val) & set(test))
        if both:
            raise CellsError(f"{what}s {both} are named for both validation and test; a {what} can be in one only")
    else:
        remaining = [g for g in known if g not in test]
        n_val = 0 if val_fraction == 0 else max(1, round(len(remaining) * val_fraction))
        if n_val >= len(remaining) and n_val > 0:
            raise CellsError(
                f"{len(remaining)} {what}s are too few to hold out {val_fraction:.0%} for validation; "
                "add data, name --val-groups, or pass --val-fraction 0"
            )
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(remaining), size=n_val, replace=False) if n_val else []
        val = sorted(remaining[i] for i in chosen)
    train = [g for g in known if g not in set(val) | set(test)]
    if not train:
        raise CellsError(f"no training {what} is left after holding out {len(val)} for validation and {len(test)} for test")
    logger.info("split by %s: %d training, %d validation, %d test %ss", what, len(train), len(val), len(test), what)
    return GroupSplit(train=train, val=val, test=test)
