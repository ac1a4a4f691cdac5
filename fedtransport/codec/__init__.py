"""Codec layer: objects <-> bytes, compression and sealing of message payloads."""

from .compress import Compressor, decompress
from .payload import PayloadCodec
from .seal import Sealer
from .serial import (
    SAFE_GLOBALS,
    EncodedUnit,
    UnpicklePolicy,
    decode_object,
    decode_records,
    encode_object,
    encode_records,
)

__all__ = [
    "SAFE_GLOBALS",
    "Compressor",
    "EncodedUnit",
    "PayloadCodec",
    "Sealer",
    "UnpicklePolicy",
    "decode_object",
    "decode_records",
    "decompress",
    "encode_object",
    "encode_records",
]
