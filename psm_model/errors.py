"""The one base class of PSM-Pose's own errors: a bad config, data file, checkpoint, tracking
store, ... The `psm` CLI prints a PsmError as one line (`psm: error: ...`, exit code 2); any
other exception is a bug and keeps its traceback. And `redact_secrets`, which every message,
param and saved config that may hold a URI or a secret passes through.
"""

import os
import re


class PsmError(Exception):
    """An error the user can act on: the message names the file and field."""


# Credentials never reach params, logs or saved configs: a URI's user:password@, a secret-looking
# query parameter, and the values of the usual secret environment variables are masked.
_USERINFO = re.compile(r"(://)[^/@\s'\"]+@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&][a-z0-9_-]*(?:secret|password|passwd|token|key|signature|credential)[a-z0-9_-]*=)"
    r"[^&\s'\"]+"
)
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
    "AZURE_STORAGE_KEY",
)


def redact_secrets(text: str) -> str:
    text = _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 6:  # a short value would mask ordinary words
            text = text.replace(value, "***")
    return text
