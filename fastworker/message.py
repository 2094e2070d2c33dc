"""Messages: one stream entry as a handler sees it, and the batch decoding of raw entries with orjson.

No I/O here. Decoding never raises: an entry that cannot be decoded becomes a `Message` whose `error` says why,
so the consumer dead-letters it with that reason instead of crashing or spinning on it. The raw field list is kept
exactly as the server sent it (bytes), so a dead letter carries the original fields even when they are not UTF-8.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Literal

import orjson
from typing_extensions import TypeVar

if TYPE_CHECKING:
    from fastworker.payloads import PayloadType

loads = orjson.loads

PayloadMode = Literal["auto", "json", "fields", "raw"]
PAYLOAD_MODES: tuple[PayloadMode, ...] = ("auto", "json", "fields", "raw")
DEFAULT_PAYLOAD_FIELD = "data"

# A raw entry as the server sends it: [entry id, [field, value, field, value, ...]], the field list None or empty
# when the entry was deleted while it was pending.
RawEntry = list[Any]
FieldValue = str | bytes | int | float
PayloadT = TypeVar("PayloadT", default=Any)


class Message(Generic[PayloadT]):
    """One stream entry: where it came from, its raw fields, the decoded payload and its delivery count.

    `payload` is the JSON document (or the flat fields as str) for an untyped handler, and an instance of the
    declared type for a handler annotated `msg: Message[AnalysisJob]` (see `fastworker.payloads`). A handler may
    call `emit()` to publish results; they are written in the same settle step that acknowledges this entry, and
    only if the handler succeeded.
    """

    __slots__ = ("deliveries", "error", "error_class", "outputs", "payload", "raw_fields", "raw_id", "stream")

    def __init__(self, stream: str, entry_id: str | bytes, raw_fields: list[bytes], payload: PayloadT,
                 deliveries: int, error: str | None = None, error_class: str = "DecodeError") -> None:
        self.stream = stream
        # Kept as the server sent it: decoded only when someone asks, and acked as is.
        self.raw_id = entry_id
        self.raw_fields = raw_fields
        self.payload = payload
        self.deliveries = deliveries
        self.error = error
        self.error_class = error_class  # why an entry with an error cannot be handled: DecodeError, PayloadInvalid
        self.outputs: list[tuple[str, list[FieldValue]]] | None = None

    @property
    def id(self) -> str:
        """The entry id, e.g. '1732530000000-0'."""
        raw = self.raw_id
        return raw.decode() if isinstance(raw, bytes) else raw

    @property
    def fields(self) -> dict[bytes, bytes]:
        """The entry's fields as a dict of bytes (built on demand: the hot path does not need it)."""
        raw = self.raw_fields
        return dict(zip(raw[::2], raw[1::2], strict=True))

    def emit(self, stream: str, payload: Any = None, *, fields: Mapping[str, FieldValue] | None = None) -> None:
        """Publish a result to `stream` when this message is acknowledged: `payload` as JSON in the `data`
        field (the app's convention; a dict, a dataclass, a msgspec Struct or a pydantic model) and/or flat
        `fields`. Raises TypeError for a payload that cannot be written as JSON."""
        flat: list[FieldValue] = []
        if payload is not None:
            flat += [DEFAULT_PAYLOAD_FIELD, orjson.dumps(payload) if type(payload) is dict else _encode(payload)]
        for key, value in (fields or {}).items():
            flat += [key, value]
        if not flat:
            raise ValueError("emit() needs a payload or at least one field")
        if self.outputs is None:
            self.outputs = []
        self.outputs.append((stream, flat))

    def __repr__(self) -> str:
        state = f" error={self.error!r}" if self.error else ""
        return f"<Message {self.stream} {self.id} deliveries={self.deliveries}{state}>"


def _encode(payload: Any) -> bytes:
    from fastworker.payloads import encode_json

    return encode_json(payload)


def text(value: bytes | str) -> str:
    """A name or id the server sent, as str."""
    return value.decode() if isinstance(value, bytes) else value


def _field_value(raw: list[bytes], name: bytes) -> bytes | None:
    # The app writes a single `data` field, so the first slot is the common case.
    if raw[0] == name:
        return raw[1]
    for index in range(2, len(raw) - 1, 2):
        if raw[index] == name:
            return raw[index + 1]
    return None


def decode_payload(raw: list[bytes], mode: PayloadMode, field: bytes) -> tuple[Any, str | None]:
    """The payload of one non-empty field list, or the reason it cannot be decoded."""
    if mode == "raw":
        return None, None
    if mode != "fields":
        document = _field_value(raw, field)
        if document is not None:
            try:
                return orjson.loads(document), None
            except orjson.JSONDecodeError as exc:
                return None, f"malformed JSON in field {field.decode()!r}: {exc}"
        if mode == "json":
            return None, f"missing payload field {field.decode()!r}"
    try:
        return {text(k): text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}, None
    except UnicodeDecodeError as exc:
        return None, f"field names or values are not UTF-8: {exc}"


def decode_entries(stream: str, entries: Iterable[RawEntry], deliveries: int | Mapping[str, int],
                   mode: PayloadMode = "auto", field: str = DEFAULT_PAYLOAD_FIELD,
                   typed: PayloadType | None = None) -> list[Message]:
    """Decode one stream's raw entries into messages, in order.

    `deliveries` is the delivery count of every entry (1 for fresh reads) or a mapping from entry id to count
    (history reads and claims, where the server's PEL knows it). An entry with no fields was deleted while it was
    pending: it becomes a message with an error, since there is nothing left to handle. With `typed`, payloads are
    built as that type, and one that does not fit becomes a message with a PayloadInvalid error.
    """
    if typed is not None:
        return _decode_typed(stream, entries, deliveries, mode, field, typed)
    field_bytes = field.encode()
    messages: list[Message] = []
    append = messages.append
    counts = None if isinstance(deliveries, int) else deliveries
    count = deliveries if isinstance(deliveries, int) else 1
    # The app's convention, a lone JSON field named `field`, skips the general path below.
    fast = mode in ("auto", "json")
    for entry_id, sent in entries:
        if counts is not None:
            count = counts.get(text(entry_id), 1)
        if fast and sent and len(sent) == 2 and sent[0] == field_bytes:
            try:
                append(Message(stream, entry_id, sent, loads(sent[1]), count))
                continue
            except orjson.JSONDecodeError:
                pass  # the general path says why
        if not sent:
            append(Message(stream, entry_id, [], None, count, "entry deleted before it was handled"))
            continue
        payload, error = decode_payload(sent, mode, field_bytes)
        append(Message(stream, entry_id, sent, payload, count, error))
    return messages


def _decode_typed(stream: str, entries: Iterable[RawEntry], deliveries: int | Mapping[str, int], mode: PayloadMode,
                  field: str, typed: PayloadType) -> list[Message]:
    from fastworker.errors import PayloadInvalid
    from fastworker.payloads import DecodeFailed

    field_bytes = field.encode()
    from_json = typed.from_json
    messages: list[Message] = []
    for entry_id, sent in entries:
        count = deliveries if isinstance(deliveries, int) else deliveries.get(text(entry_id), 1)
        if not sent:
            messages.append(Message(stream, entry_id, [], None, count, "entry deleted before it was handled"))
            continue
        try:
            document = _field_value(sent, field_bytes) if mode != "fields" else None
            if document is not None:
                payload = from_json(document)
            elif mode == "json":
                raise DecodeFailed(f"missing payload field {field!r}")
            else:
                payload = typed.from_fields({text(k): text(v) for k, v in zip(sent[::2], sent[1::2], strict=True)})
        except PayloadInvalid as exc:
            messages.append(Message(stream, entry_id, sent, None, count, f"{typed.name}: {exc}", "PayloadInvalid"))
        except (DecodeFailed, UnicodeDecodeError, ValueError) as exc:
            messages.append(Message(stream, entry_id, sent, None, count, f"{exc}"))
        else:
            messages.append(Message(stream, entry_id, sent, payload, count))
    return messages


def encode_record(message: Message) -> bytes:
    """An idempotency record: which entry did the work and the outputs it emitted (bytes kept exact as latin-1)."""
    def text(value: FieldValue) -> str:
        if isinstance(value, bytes):
            return value.decode("latin-1")
        return str(value).encode().decode("latin-1")

    outputs = [[stream, [text(value) for value in fields]] for stream, fields in message.outputs or ()]
    return orjson.dumps({"id": message.id, "outputs": outputs})


def decode_record(record: bytes) -> tuple[str, list[tuple[str, list[FieldValue]]]]:
    """(entry id that did the work, its outputs)."""
    data = orjson.loads(record)
    return data["id"], [(stream, [value.encode("latin-1") for value in fields]) for stream, fields in data["outputs"]]
