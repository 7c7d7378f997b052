"""Which Program each rank runs: rank -> class by arithmetic on mesh coordinates.

Programs are keyed by ``class_key`` coordinates (e.g. ``{"pp": 3}``). All programs must use the
same key axes and cover every combination of their coordinates exactly once, so a rank's class
is a dict lookup of its coordinates on those axes (no scan over ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from math import prod

from tensorstage.parallel.mesh import Mesh
from tensorstage.schedule.program import Program


@dataclass(frozen=True)
class RankClasses:
    """Programs sorted by class key; ``class_of(rank)`` is O(number of key axes)."""

    mesh: Mesh
    key_axes: tuple[str, ...]
    programs: tuple[Program, ...]
    lookup: dict[tuple[int, ...], int]

    @staticmethod
    def build(programs: Sequence[Program], mesh: Mesh) -> RankClasses:
        """Check the keys cover the mesh and number the classes in sorted key order (deterministic)."""
        if not programs:
            raise ValueError("no programs given")
        key_axes = tuple(sorted(programs[0].class_key))
        for p in programs:
            if tuple(sorted(p.class_key)) != key_axes:
                raise ValueError(f"programs disagree on class-key axes: {sorted(p.class_key)} vs {list(key_axes)}")
        for a in key_axes:
            mesh.axis(a)  # raises SpecError on an unknown axis
        if key_axes:
            mesh.view_of(key_axes)
        ordered = sorted(programs, key=lambda p: tuple(p.class_key[a] for a in key_axes))
        lookup: dict[tuple[int, ...], int] = {}
        for i, p in enumerate(ordered):
            key = tuple(p.class_key[a] for a in key_axes)
            if key in lookup:
                raise ValueError(f"two programs share class key {dict(zip(key_axes, key, strict=True))}")
            lookup[key] = i
        expected = set(product(*(range(mesh.axis(a).size) for a in key_axes)))
        if set(lookup) != expected:
            missing = sorted(expected - set(lookup))[:4]
            extra = sorted(set(lookup) - expected)[:4]
            raise ValueError(f"class keys over {list(key_axes)} must cover the mesh exactly: "
                             f"missing {missing}, out of range {extra}")
        return RankClasses(mesh, key_axes, tuple(ordered), lookup)

    def class_of(self, rank: int) -> int:
        coord = self.mesh.coord
        return self.lookup[tuple(coord(rank, a) for a in self.key_axes)]

    def ranks_per_class(self) -> int:
        """Every class has the same number of ranks: world / product of key-axis sizes."""
        return self.mesh.world // prod(self.mesh.axis(a).size for a in self.key_axes)

    def representative(self, class_id: int) -> int:
        """Lowest rank of a class: key coordinates set, every other coordinate 0."""
        key = dict(self.programs[class_id].class_key)
        if not key:
            return 0
        view = self.mesh.view_of(self.key_axes)
        return sum(key.get(a.name, 0) * a.stride for a in view)

    def rule(self) -> dict[str, object]:
        """JSON-able description of the rank -> class rule."""
        return {
            "key_axes": list(self.key_axes),
            "class_of_rank": "class id whose key equals the rank's coordinates on key_axes; "
                             "coordinate on axis a = (rank // stride_a) % size_a",
            "axes": {a: {"size": self.mesh.axis(a).size, "stride": self.mesh.axis(a).stride}
                     for a in self.key_axes},
            "classes": {str(i): dict(p.class_key) for i, p in enumerate(self.programs)},
        }
