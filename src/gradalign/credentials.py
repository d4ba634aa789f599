"""Passwords kept out of every record: masked in text, in params and tags, in log lines and in
copies of files.

A store URL can hold a password (``postgresql+psycopg://user:PASSWORD@host/db``,
``http://user:PASSWORD@host:5000``, ``...?password=PASSWORD``). The processes need it to connect,
but nothing they record may keep it: MLflow params and tags, the ``.hydra/`` files logged as
artifacts, Optuna's user attrs, log lines and error messages show ``***`` in its place. The
user's own files (the config and the Hydra outputs on disk) are left as they are.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"
# scheme://user:password@: the password runs to the last @ before the host (an @ inside it must
# be percent-encoded in a URL, but users do not always encode it). Hydra writes an override's
# colons escaped (http\://user\:password@host\:5000) in .hydra/overrides.yaml.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*\\?://[^\s:/@'\"\\]*\\?:)[^\s/'\"]*@")
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)[^&\s'\"]*", re.IGNORECASE)


def mask(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def masked(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every string value masked (other values as they are)."""
    return {key: mask(value) if isinstance(value, str) else value for key, value in values.items()}


def mask_logs() -> None:
    """Mask passwords in every log record this process creates (its message and traceback),
    whatever logger and handler (Hydra replaces the handlers for each job and each launch).
    Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "masks_passwords", False):
        return

    def masking_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        message = record.getMessage()
        clean = mask(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # what a handler's formatter would print
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        return record

    masking_factory.masks_passwords = True
    logging.setLogRecordFactory(masking_factory)


def masked_copy(source: Path, target: Path) -> Path:
    """Copy directory ``source`` to ``target`` (which must not exist), every text file in it
    masked; ``target``. Files that are not UTF-8 text are copied as they are."""
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        clean = mask(text)
        if clean != text:
            path.write_text(clean, encoding="utf-8")
    return target
