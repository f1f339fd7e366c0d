"""Parquet image shards: ``export_parquet`` writes a ``DatasetSplits``; ``read_parquet`` reads it back.

Layout: ``OUT/{train,val,test}-00000.parquet``, ``-00001`` ... with columns ``image`` (binary) and
``label`` (int64). ``image`` holds PNG or JPEG bytes, or, for ``encoding="raw"``, the image's uint8
pixels in ``(C, H, W)`` order with int32 columns ``height``, ``width`` and ``channels`` beside it.
The schema metadata records ``scaling.num_classes``, ``scaling.class_names`` (JSON), ``scaling.name``
and ``scaling.encoding``. Shards written by other tools load too when they have these two columns.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scaling.data._files import PathArg, require_root
from scaling.data._image import decode_rgb, encode, quiet_codecs, resize, to_rgb
from scaling.data.base import DataError, DatasetSplits, ImageSet

__all__ = ["ENCODINGS", "SPLITS", "export_parquet", "read_parquet"]

ENCODINGS = ("png", "jpeg", "raw")
SPLITS = ("train", "val", "test")
HOW = "write shards with scaling.data.export_parquet(load_dataset(...), ROOT)"
_MAX_SHARD_BYTES = 2**31 - 1  # int32 offsets of the binary column
Part = tuple[torch.Tensor, torch.Tensor]
_SHARD_NAME = re.compile(r"^(train|val|test)-(\d{5,})\.parquet$")


# --- writing ------------------------------------------------------------------------------------


def _image_column(images: torch.Tensor, encoding: str) -> pa.Array:
    """One binary value per image of uint8 ``(N, C, H, W)``."""
    if encoding == "raw":
        n = images.shape[0]
        row = images[0].numel() if n else 0
        if n * row > _MAX_SHARD_BYTES:
            raise ValueError(f"a shard of {n} raw images exceeds 2 GiB; lower rows_per_shard")
        pixels = np.ascontiguousarray(images.numpy()).reshape(-1)
        offsets = np.arange(n + 1, dtype=np.int32) * np.int32(row)
        return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(pixels)])
    with quiet_codecs():
        return pa.array([encode(image, encoding) for image in images], type=pa.binary())


def _shard_table(part: ImageSet, encoding: str, metadata: dict[bytes, bytes]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "image": _image_column(part.images, encoding),
        "label": pa.array(part.labels.numpy(), type=pa.int64()),
    }
    if encoding == "raw":
        n, c, h, w = part.images.shape
        for name, value in (("height", h), ("width", w), ("channels", c)):
            columns[name] = pa.array(np.full(n, value, dtype=np.int32))
    return pa.table(columns).replace_schema_metadata(metadata)


def export_parquet(
    splits: DatasetSplits, out_dir: PathArg, *, encoding: str = "png", rows_per_shard: int = 2048
) -> list[Path]:
    """Write ``splits`` as Parquet shards ``out_dir/{train,val,test}-NNNNN.parquet``.

    Every shard goes to a temporary file first and is renamed into place once all are written;
    shards of an earlier export that the new one does not overwrite are removed. An empty split
    still gets one (empty) shard, so the loader knows the split exists.

    Args:
        splits: the dataset to write (e.g. from ``load_dataset``).
        out_dir: the directory to write to (created if needed).
        encoding: ``"png"`` (lossless), ``"jpeg"`` (quality 95, lossy) or ``"raw"`` (uint8 pixels).
        rows_per_shard: images per shard.
    Returns:
        The written shard paths, train first.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    metadata = {
        b"scaling.name": splits.name.encode(),
        b"scaling.num_classes": str(splits.num_classes).encode(),
        b"scaling.class_names": json.dumps(list(splits.class_names)).encode(),
        b"scaling.encoding": encoding.encode(),
    }
    pending: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for split in SPLITS:
            part: ImageSet = getattr(splits, split)
            starts = range(0, max(len(part), 1), rows_per_shard)
            for shard, start in enumerate(starts):
                rows = torch.arange(start, min(start + rows_per_shard, len(part)))
                table = _shard_table(part.subset(rows), encoding, metadata)
                # A unique hidden name (not mkstemp, whose 0600 mode would survive the rename).
                temporary = out / f".{split}-{shard:05d}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
                pending.append((temporary, out / f"{split}-{shard:05d}.parquet"))
                pq.write_table(table, temporary)
    except BaseException:
        for temporary, _ in pending:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, final in pending:
        os.replace(temporary, final)
    written = {final for _, final in pending}
    for stale in _shard_paths(out):
        if stale not in written:
            stale.unlink(missing_ok=True)
    return [final for _, final in pending]


# --- reading ------------------------------------------------------------------------------------


def _shard_paths(directory: Path, split: str | None = None) -> list[Path]:
    """Shard files in ``directory`` (of one split when given), in shard order."""
    found = []
    for path in directory.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match and (split is None or match.group(1) == split) and path.is_file():
            found.append((match.group(1), int(match.group(2)), path))
    return [path for _, _, path in sorted(found)]


def _binary_buffers(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The ``image`` column as ``(offsets, values)``: int64 ``(N + 1,)`` and uint8 bytes.

    Image ``i`` is ``values[offsets[i]:offsets[i + 1]]``. Accepts ``binary`` and ``large_binary``.
    """
    column = table.column("image").combine_chunks()
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ValueError(f"column 'image' has type {column.type}, expected binary")
    if column.null_count:
        raise ValueError(f"column 'image' has {column.null_count} null values")
    n = len(column)
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], dtype=offset_type)[column.offset : column.offset + n + 1]
    data = column.buffers()[2]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    return offsets.astype(np.int64), values


def _decode_raw(table: pa.Table, image_size: int) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` from the raw pixel bytes and their shape columns."""
    offsets, values = _binary_buffers(table)
    n = len(offsets) - 1
    shapes = np.stack([table.column(c).to_numpy() for c in ("channels", "height", "width")], axis=1)
    if n == 0:
        return torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    if (shapes == shapes[0]).all() and (np.diff(offsets) == shapes[0].prod()).all():
        pixels = values[offsets[0] : offsets[-1]].reshape(n, *shapes[0].tolist())
        return torch.from_numpy(pixels.copy())  # copy: the Arrow buffer is read-only
    # Mixed shapes: bring every image to RGB at image_size on its own.
    images = []
    for i, (c, h, w) in enumerate(shapes.tolist()):
        pixels = values[offsets[i] : offsets[i + 1]].reshape(1, c, h, w)
        images.append(resize(to_rgb(torch.from_numpy(pixels.copy())), image_size)[0])
    return torch.stack(images)


def _decode_encoded(table: pa.Table, image_size: int) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` from PNG/JPEG bytes (resized to ``image_size`` if sizes differ)."""
    offsets, values = _binary_buffers(table)
    n = len(offsets) - 1
    if n == 0:
        return torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    # One writable copy of all the bytes; each image is a view into it.
    data = torch.from_numpy(values[offsets[0] : offsets[-1]].copy())
    offsets = offsets - offsets[0]
    with quiet_codecs():
        images = [decode_rgb(data[offsets[i] : offsets[i + 1]]) for i in range(n)]
    if any(image.shape != images[0].shape for image in images):
        images = [resize(image.unsqueeze(0), image_size)[0] for image in images]
    return torch.stack(images)


def _read_split(directory: Path, split: str, image_size: int) -> tuple[Part | None, dict[bytes, bytes]]:
    """One split's shards as ``(images, labels)`` (``None`` without shards) and their schema metadata."""
    paths = _shard_paths(directory, split)
    if not paths:
        return None, {}
    where = f"dataset 'parquet': the {split} shards in {directory}"
    try:
        table = pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{where} cannot be read ({err})") from err
    missing = {"image", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"{where} lack the columns {sorted(missing)}; {HOW}")
    if table.column("label").null_count:
        raise DataError(f"{where} have missing labels")
    raw = "height" in table.column_names
    try:
        images = _decode_raw(table, image_size) if raw else _decode_encoded(table, image_size)
    except (RuntimeError, ValueError) as err:
        raise DataError(f"{where} hold images that cannot be decoded ({err})") from err
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64, copy=True))
    return (images, labels), dict(table.schema.metadata or {})


def read_parquet(
    root: PathArg | None, *, image_size: int
) -> tuple[dict[str, Part | None], int | None, tuple[str, ...]]:
    """Read the shards under ``root``.

    Returns:
        ``(parts, num_classes, class_names)``: ``parts`` maps ``train``, ``val`` and ``test`` to
        ``(images, labels)`` (uint8 ``(N, C, H, W)``, int64 ``(N,)``) or to ``None`` where the split
        has no shards; ``num_classes`` is ``None`` when the metadata does not record it.
    """
    directory = require_root("parquet", root, HOW)
    parts: dict[str, Part | None] = {}
    metadata: dict[bytes, bytes] = {}
    for split in SPLITS:
        parts[split], split_metadata = _read_split(directory, split, image_size)
        metadata = metadata or split_metadata
    if parts["train"] is None:
        raise DataError(f"dataset 'parquet': no train-NNNNN.parquet shards in {directory}; {HOW}")
    num_classes = int(metadata[b"scaling.num_classes"]) if b"scaling.num_classes" in metadata else None
    class_names = tuple(json.loads(metadata.get(b"scaling.class_names", b"[]")))
    return parts, num_classes, class_names
