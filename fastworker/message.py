"""Messages: one stream entry as a handler sees it, and the batch decoding of raw entries with orjson.

No I/O here. Decoding never raises: an entry that cannot be decoded becomes a `Message` whose `error` says why,
so the consumer dead-letters it with that reason instead of crashing or spinning on it. The raw field list is kept
exactly as the server sent it (bytes), so a dead letter carries the original fields even when they are not UTF-8.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import orjson

loads = orjson.loads

PayloadMode = Literal["auto", "json", "fields", "raw"]
PAYLOAD_MODES: tuple[PayloadMode, ...] = ("auto", "json", "fields", "raw")
DEFAULT_PAYLOAD_FIELD = "data"

# A raw entry as the server sends it: [entry id, [field, value, field, value, ...]], the field list None or empty
# when the entry was deleted while it was pending.
RawEntry = list[Any]
FieldValue = str | bytes | int | float


class Message:
    """One stream entry: where it came from, its raw fields, the decoded payload and its delivery count.

    A handler may call `emit()` to publish results; they are written in the same settle step that acknowledges
    this entry, and only if the handler succeeded.
    """

    __slots__ = ("deliveries", "error", "outputs", "payload", "raw_fields", "raw_id", "stream")

    def __init__(self, stream: str, entry_id: str | bytes, raw_fields: list[bytes], payload: Any, deliveries: int,
                 error: str | None = None) -> None:
        self.stream = stream
        # Kept as the server sent it: decoded only when someone asks, and acked as is.
        self.raw_id = entry_id
        self.raw_fields = raw_fields
        self.payload = payload
        self.deliveries = deliveries
        self.error = error
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
        field (the app's convention) and/or flat `fields`."""
        flat: list[FieldValue] = []
        if payload is not None:
            flat += [DEFAULT_PAYLOAD_FIELD, orjson.dumps(payload)]
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
                   mode: PayloadMode = "auto", field: str = DEFAULT_PAYLOAD_FIELD) -> list[Message]:
    """Decode one stream's raw entries into messages, in order.

    `deliveries` is the delivery count of every entry (1 for fresh reads) or a mapping from entry id to count
    (history reads and claims, where the server's PEL knows it). An entry with no fields was deleted while it was
    pending: it becomes a message with an error, since there is nothing left to handle.
    """
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
