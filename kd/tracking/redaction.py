"""Secrets kept out of MLflow: environment values whose names say they are secrets are replaced
in every param, tag and artifact a row's run records."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I
)
REDACTED = "<redacted>"


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they are secrets (tokens, passwords, keys)."""
    environ = os.environ if environ is None else environ
    return sorted(
        {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 6},
        key=len,
        reverse=True,
    )


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret environment value replaced, so that a secret interpolated into a
    row (`${oc.env:HF_TOKEN}`) never reaches MLflow as a param, tag or artifact."""
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text
