"""Tracking URIs as they are shown: without the credentials they may carry.

    redact("http://alice:pw@host:5000")         # 'http://alice:***@host:5000'
    redact("https://host/?token=abc")           # 'https://host/?token=***'
    reveal("http://alice:***@host:5000")        # 'http://host:5000', MLflow's credentials set

Whatever is logged, recorded, reported or printed goes through `redact` (any text: an error
message naming a URL too); the MLflow client connects through `reveal`. The full URI reaches a
job in its environment (MLFLOW_TRACKING_URI), never on a command line, which every user of the
host can read; MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or
MLFLOW_TRACKING_TOKEN) keep credentials out of the URI altogether.
"""
from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

MASK = "***"
# scheme://user:password@ -> scheme://user:***@
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@'\"]*):[^\s/@'\"]*@")
# ?token=... / &password=... : query parameters whose names say they hold a credential
_SECRET_PARAM = re.compile(r"(?P<head>[?&;][^=&\s'\"#]*(?:token|pass|pwd|secret|key|sig|auth|credential)"
                           r"[^=&\s'\"#]*=)[^&\s'\"#]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` (a URI, or a message naming one) with every URI's password and credential query
    values replaced by ***; anything else unchanged (redact(redact(x)) == redact(x))."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", str(text))
    return _SECRET_PARAM.sub(lambda m: f"{m['head']}{MASK}", text)


def reveal(uri: str) -> str:
    """The URI to connect to for `uri` (as shown, or full). As shown: the full MLFLOW_TRACKING_URI
    when `uri` is its redacted form; else, when MLflow has its credentials from
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, `uri` without its userinfo; else
    ValueError naming the URI and the fix. An http(s) URI's user and password move to those two
    variables (MLflow sends them; when both are set already, they win, as they do in MLflow):
    MLflow puts the URI it is given into its messages."""
    if MASK in uri:
        full = os.environ.get("MLFLOW_TRACKING_URI", "")
        if full and redact(full) == uri:
            uri = full
        elif _env_credentials() and not _SECRET_PARAM.search(uri):
            return without_userinfo(uri)
        else:
            raise ValueError(f"tracking URI {uri} is shown without its credentials: set MLFLOW_TRACKING_URI "
                             f"to the full URI, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri
    if not _env_credentials():
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return without_userinfo(uri)


def _env_credentials() -> bool:
    """Whether MLflow sends credentials of its own variables (it needs both)."""
    return bool(os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"))


def without_userinfo(uri: str) -> str:
    """`uri` without its user:password@ part."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", uri)


def export_uri(uri: str) -> str:
    """Put the full tracking URI `uri` in this process's MLFLOW_TRACKING_URI, for its MLflow
    clients and the jobs it starts (unless `uri` is already a redacted form); return it redacted."""
    if MASK not in uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return redact(uri)
