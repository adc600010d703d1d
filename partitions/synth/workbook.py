"""Byte-reproducible ``.xlsx`` files: openpyxl stamps the save time into the document and the zip entries."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

from openpyxl import Workbook

FIXED_TIME = (2019, 7, 1, 0, 0, 0)
FIXED_ISO = "2019-07-01T00:00:00Z"


def save_reproducibly(workbook: Workbook, path: Path) -> None:
    """Save so that the same content always gives the same bytes (fixed timestamps, fixed zip entry dates)."""
    buffer = io.BytesIO()
    workbook.save(buffer)
    buffer.seek(0)
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*", rb"\g<1>" + FIXED_ISO.encode(), data)
            target.writestr(zipfile.ZipInfo(info.filename, date_time=FIXED_TIME), data, zipfile.ZIP_DEFLATED)
    path.write_bytes(out.getvalue())
