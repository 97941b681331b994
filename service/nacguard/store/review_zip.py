"""The marked review set as one zip archive (what the operator page's export downloads).

Same layout and rows as ``nacguard review export`` writes to a folder, plus each entry's mark::

    images/<entry id>.<ext>   the image bytes, where they were kept
    index.json                list of rows (``INDEX_COLUMNS`` + ``mark``)
    index.csv                 the same rows as CSV
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Sequence
from typing import IO

from nacguard.store.records import INDEX_COLUMNS, ReviewItem, image_extension, safe_name

__all__ = ["ZIP_COLUMNS", "write_review_zip"]

#: Columns of the archive's index: the export's, then the operator's mark.
ZIP_COLUMNS = (*INDEX_COLUMNS, "mark")


def write_review_zip(items: Sequence[ReviewItem], out: IO[bytes]) -> int:
    """Write ``items`` as a zip archive to ``out``.

    Images are stored uncompressed (they are compressed formats already); the indexes are
    deflated. File names inside come from :func:`safe_name` of the entry id, never from content.

    Args:
        items: the entries to write, in index order.
        out: a binary file opened for writing (seekable or not).

    Returns:
        The number of images written.
    """
    rows = []
    images = 0
    with zipfile.ZipFile(out, "w") as archive:
        for item in items:
            rec = item.entry.record
            image_file = None
            if rec.image is not None:
                image_file = (
                    f"images/{safe_name(item.entry.id)}.{image_extension(rec.content_type)}"
                )
                archive.writestr(image_file, rec.image, compress_type=zipfile.ZIP_STORED)
                images += 1
            rows.append({**item.entry.row(image_file), "mark": item.mark})
        archive.writestr(
            "index.json", json.dumps(rows, indent=1), compress_type=zipfile.ZIP_DEFLATED
        )
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=ZIP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        archive.writestr("index.csv", text.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    return images
