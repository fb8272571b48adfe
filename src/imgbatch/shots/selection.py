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
    """The shots whose request key falls in shard K of N (`shard` = (K, N), K from 1), in their
    order. The distinct keys of `shots`, sorted (a key is a hash, so by its value), are cut into
    N contiguous ranges of equal count: shard K takes ranks [floor((K-1)*D/N), floor(K*D/N)) of
    the D keys. So shards are equal within one key; the split depends only on the set of keys
    (stable under renames and reordering); twins (one request, one key) are always together; and
    adding or removing m shots moves at most m keys across each boundary between shards.

    >>> from types import SimpleNamespace as S
    >>> shots = [S(request=S(key=f"{n:02x}" + "0" * 62)) for n in (5, 0, 3, 1, 4, 2, 3)]
    >>> [[shot.request.key[:2] for shot in in_shard(shots, (k, 3))] for k in (1, 2, 3)]
    [['00', '01'], ['03', '02', '03'], ['05', '04']]
    """
    index, count = shard
    keys = sorted({shot.request.key for shot in shots})
    # A split by hash modulo N would keep every other key in place after an edit, but its shards
    # are unequal (1,000 keys fell 228 to 273 in four), and the largest bounds a matrix's time.
    chosen = set(keys[(index - 1) * len(keys) // count : index * len(keys) // count])
    return tuple(shot for shot in shots if shot.request.key in chosen)
