"""Typed payloads: turn an entry's JSON document or flat string fields into the type its handler declared.

Supported: `msgspec.Struct` (the recommended default: msgspec decodes and validates JSON in C, in one pass), plain
dataclasses and TypedDicts (also through msgspec), and pydantic models (when pydantic is installed). JSON is decoded
straight into the type; flat fields (all strings on the wire) are converted with the usual string rules ("42" ->
42, "0.5" -> 0.5, "true" -> True). An entry that does not fit raises `PayloadInvalid` naming the field path
(`$.params.days: expected int, got str`); malformed JSON raises `DecodeFailed`. No I/O here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, get_type_hints, is_typeddict

import msgspec
import orjson

from fastworker.errors import PayloadInvalid

_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


class DecodeFailed(ValueError):
    """The payload field is not valid JSON."""


class PayloadType:
    """How to build one declared payload type from a JSON document or from flat string fields."""

    def __init__(self, kind: Any) -> None:
        self.kind = kind
        self.name = getattr(kind, "__name__", repr(kind))
        if _is_pydantic(kind):
            self.from_json: Callable[[bytes], Any] = self._pydantic_json
            self.from_fields: Callable[[dict[str, str]], Any] = self._pydantic_fields
        else:
            self._decoder = msgspec.json.Decoder(kind)
            self.from_json = self._msgspec_json
            self.from_fields = self._msgspec_fields

    @staticmethod
    def supports(kind: Any) -> bool:
        return isinstance(kind, type) and (issubclass(kind, msgspec.Struct) or dataclasses.is_dataclass(kind)
                                           or is_typeddict(kind) or _is_pydantic(kind))

    def _msgspec_json(self, data: bytes) -> Any:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise PayloadInvalid(_msgspec_message(exc)) from None
        except msgspec.DecodeError as exc:
            raise DecodeFailed(str(exc)) from None

    def _msgspec_fields(self, fields: dict[str, str]) -> Any:
        try:
            return msgspec.convert(fields, self.kind, strict=False)
        except msgspec.ValidationError as exc:
            raise PayloadInvalid(_with_value(_msgspec_message(exc), fields)) from None

    def _pydantic_json(self, data: bytes) -> Any:
        import pydantic

        try:
            return self.kind.model_validate_json(data)
        except pydantic.ValidationError as exc:
            if any(error["type"] == "json_invalid" for error in exc.errors()):
                raise DecodeFailed(str(exc.errors()[0]["msg"])) from None
            raise PayloadInvalid(_pydantic_message(exc)) from None

    def _pydantic_fields(self, fields: dict[str, str]) -> Any:
        import pydantic

        try:
            return self.kind.model_validate(fields)
        except pydantic.ValidationError as exc:
            raise PayloadInvalid(_with_value(_pydantic_message(exc), fields)) from None


def payload_type_of(func: Callable[..., Any], declared: Any = None) -> PayloadType | None:
    """The payload type a handler asks for: `declared` (the decorator's `payload_type`), else the `T` of a first
    parameter annotated `Message[T]`; None for an untyped handler. Raises TypeError for a type it cannot build."""
    kind = declared if declared is not None else _annotated(func)
    if kind is None:
        return None
    if not PayloadType.supports(kind):
        raise TypeError(f"payload type {kind!r} is not supported: use a msgspec.Struct, a dataclass, a TypedDict or a "
                        "pydantic model")
    return PayloadType(kind)


def _annotated(func: Callable[..., Any]) -> Any:
    from fastworker.message import Message

    try:
        hints = get_type_hints(func)
    except Exception:  # an annotation that does not resolve: the handler is untyped as far as we can tell
        return None
    hints.pop("return", None)
    first: Any = next(iter(hints.values()), None)
    if getattr(first, "__origin__", None) is Message and first.__args__[0] is not Any:
        return first.__args__[0]
    return None


def _is_pydantic(kind: Any) -> bool:
    return isinstance(kind, type) and hasattr(kind, "model_validate_json") and hasattr(kind, "model_fields")


def _msgspec_message(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.params.days`" as "$.params.days: expected int, got str"."""
    match = _MSGSPEC_PATH.match(str(exc))
    what, path = (match["what"], match["path"]) if match else (str(exc), None)
    what = what.replace("`", "")
    return f"{path or '$'}: {what[:1].lower()}{what[1:]}"


def _with_value(message: str, fields: dict[str, str]) -> str:
    """Flat fields are all strings on the wire, so "got str" says little: quote the value that did not fit."""
    path = message.split(":", 1)[0]
    name = path[2:] if path.startswith("$.") else None
    if name in fields:
        return f"{message} ({fields[name][:100]!r})"
    return message


def _pydantic_message(exc: Any) -> str:
    first = exc.errors()[0]
    path = "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    what = str(first["msg"])
    return f"{path}: {what[:1].lower()}{what[1:]}{more}"


_ENCODER = msgspec.json.Encoder()


def encode_json(value: Any) -> bytes:
    """A result as JSON: msgspec Structs and dataclasses by msgspec (in C, no dict in between), pydantic models by
    pydantic, anything else by orjson. Raises TypeError for what none of them can write."""
    if isinstance(value, msgspec.Struct) or dataclasses.is_dataclass(value):
        return _ENCODER.encode(value)
    if hasattr(value, "model_dump_json"):
        return str(value.model_dump_json()).encode()
    return orjson.dumps(value)
