"""Files read only up to a bound are read holding what they hold, not the bound.

Takes a small file of each kind imgbatch reads with a size limit (a manifest, 64 MiB; an image
in the output folder, 64 MiB; a reference image, 10 MiB; an object in a shared folder store,
64 MiB); gives evidence, by tracemalloc's peak, that reading one allocates about its own size.
`stream.read(limit + 1)` allocated the whole limit first: 64 MiB to read a manifest of 80 bytes.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from imgbatch.manifest.reference import load_local_reference
from imgbatch.manifest.yaml_load import MAX_MANIFEST_BYTES, read_manifest_text
from imgbatch.png import read_image_file
from imgbatch.state.store.local import FolderStore
from tests.support.reference_images import PNG

MIB = 1024 * 1024
SMALL_MANIFEST = "version: 1\nshots:\n  - id: a\n    prompt: a red bicycle\n"


def peak_bytes(read: Callable[[], object]) -> int:
    """The most memory Python held at once while `read` ran, over what it held before."""
    tracemalloc.start()
    try:
        read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_small_manifest_is_read_without_allocating_its_64_mib_bound(tmp_path: Path) -> None:
    path = tmp_path / "shots.yaml"
    path.write_text(SMALL_MANIFEST, encoding="utf-8")
    assert read_manifest_text(path, "shots.yaml") == SMALL_MANIFEST
    assert peak_bytes(lambda: read_manifest_text(path, "shots.yaml")) < 64 * 1024


def test_a_manifest_over_the_bound_is_still_refused(tmp_path: Path) -> None:
    from imgbatch.errors import ManifestError

    path = tmp_path / "shots.yaml"
    with path.open("wb") as handle:
        handle.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: nothing written
    with pytest.raises(ManifestError, match="at most 64 MiB"):
        read_manifest_text(path, "shots.yaml")


def read_reference(tmp_path: Path) -> Callable[[], object]:
    (tmp_path / "face.png").write_bytes(PNG)
    return lambda: load_local_reference("face.png", tmp_path, allow_outside=False)


def read_output_image(tmp_path: Path) -> Callable[[], object]:
    (tmp_path / "a.png").write_bytes(PNG)
    return lambda: read_image_file(tmp_path / "a.png")


def read_store_object(tmp_path: Path) -> Callable[[], object]:
    store = FolderStore(tmp_path / "store")
    asyncio.run(store.create("blobs/a", PNG))
    return lambda: store._get("blobs/a")


@pytest.mark.parametrize(
    "reader",
    [read_reference, read_output_image, read_store_object],
    ids=["reference image", "output image", "shared store object"],
)
def test_other_bounded_files_are_read_without_allocating_their_bound(
    tmp_path: Path, reader: Callable[[Path], Callable[[], object]]
) -> None:
    read = reader(tmp_path)
    read()  # imports and caches warmed up: the peak below is the read's own
    # The reference is decoded too (its pixels are checked): a few hundred KB, not 10 MiB.
    assert peak_bytes(read) < 3 * MIB
