"""`--only`: the shots a plan or an apply acts on, chosen by id or glob.

Takes the expanded shots (in manifest order) and patterns (`s01-dawn-road`, `s0*`, `*-noon`;
`fnmatch` globs, matched case-sensitively against the whole id); gives the shots any pattern
matches, still in manifest order, or raises `ConfigError` naming every pattern that matches no
shot (a typo must not silently act on nothing):

    >>> from imgbatch.run.apply import load_and_expand
    >>> _, expansion = load_and_expand("manifests/matrix.yaml", "placeholder")
    >>> [shot.id for shot in select_shots(expansion.shots, ["*-noon"])]
    ['s03-front-noon', 's03-side-noon', 's03-top-noon']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from imgbatch.errors import ConfigError
from imgbatch.shots.expand import Shot


def select_shots(shots: tuple[Shot, ...], patterns: Iterable[str]) -> tuple[Shot, ...]:
    patterns = tuple(dict.fromkeys(patterns))
    if not patterns:
        return shots
    used: set[str] = set()
    chosen = []
    for shot in shots:
        matched = [pattern for pattern in patterns if fnmatchcase(shot.id, pattern)]
        if matched:
            chosen.append(shot)
            used.update(matched)
    unused = [pattern for pattern in patterns if pattern not in used]
    if unused:
        listed = ", ".join(repr(pattern) for pattern in unused)
        which = f"pattern {listed} matches" if len(unused) == 1 else f"patterns {listed} match"
        raise ConfigError(
            f"--only {which} no shot id (the manifest has {len(shots)} "
            f"shot{'s' if len(shots) != 1 else ''}; `imgbatch expand` lists them)"
        )
    return tuple(chosen)


def in_shard(shots: Sequence[Shot], shard: tuple[int, int]) -> tuple[Shot, ...]:
    """The shots whose request key falls in shard K of N (`shard` = (K, N), K from 1): stable
    under renames and reordering, and twins (one request) always in the same shard.

    >>> from types import SimpleNamespace as S
    >>> shots = [S(request=S(key=f"{n:02x}" + "0" * 62)) for n in range(6)]
    >>> [len(in_shard(shots, (k, 3))) for k in (1, 2, 3)]
    [2, 2, 2]
    """
    index, count = shard
    return tuple(shot for shot in shots if int(shot.request.key[:16], 16) % count == index - 1)
