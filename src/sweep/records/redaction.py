"""Secrets never leave the process: credentials in URIs, values of secret-named keys and environment variables
are replaced by `***` in everything sweep logs (params, tags, run names, descriptions, text artifacts)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TypeVar

Record = TypeVar("Record")

MASK = "***"
# A key or environment variable whose name says it holds a secret.
SECRET_NAME = re.compile(r"token(?![a-z])|secret|passw(or)?d|api[_-]?key|access[_-]?key|private[_-]?key|(^|[_.-])key$",
                         re.IGNORECASE)
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# `name: value`, `name=value` or `"name": "value"` where the name says secret (config.yaml, command lines).
_SECRET_ASSIGNMENT = re.compile(
    r"(?P<key>[\w.-]*(?:token(?![a-z])|secret|passw(?:or)?d|api[_-]?key|access[_-]?key|private[_-]?key)[\w-]*)"
    r"(?P<sep>\"?\s*[:=]\s*\"?)(?P<value>[^\s\"',}]+)",
    re.IGNORECASE,
)
_MIN_SECRET_LENGTH = 6  # shorter environment values ("1", "true") would mask innocent text


def secret_environment_values() -> list[str]:
    """Values of environment variables named like TOKEN, KEY, SECRET or PASSWORD, longest first."""
    values = {value for name, value in os.environ.items()
              if SECRET_NAME.search(name) and len(value) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_uri(uri: str) -> str:
    """`http://user:pw@host:5000` -> `http://***@host:5000`."""
    return _URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}{MASK}@", uri)


def redact_text(text: str) -> str:
    text = redact_uri(text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)
    for value in secret_environment_values():
        text = text.replace(value, MASK)
    return text


def redact_mapping(values: dict[str, str]) -> dict[str, str]:
    """Params or tags: a secret-named key keeps its name and loses its value; every value is redacted."""
    return {key: MASK if SECRET_NAME.search(key) else redact_text(value) for key, value in values.items()}


def redact_record(result: Record) -> Record:
    """A copy of a JobResult with its name, reason, params, tags and text artifacts redacted."""
    return dataclasses.replace(
        result,  # type: ignore[type-var]
        name=redact_text(result.name),  # type: ignore[attr-defined]
        reason=redact_text(result.reason),  # type: ignore[attr-defined]
        params=redact_mapping(result.params),  # type: ignore[attr-defined]
        tags=redact_mapping(result.tags),  # type: ignore[attr-defined]
        artifacts={path: content if isinstance(content, bytes) else redact_text(content)
                   for path, content in result.artifacts.items()},  # type: ignore[attr-defined]
    )
