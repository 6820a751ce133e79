"""HPACK decoding (``h2.hpack``): what RFC 7541 refuses is refused, what it allows decodes as it
was encoded, and no block an attacker sends makes jh2's Rust core write to stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.framework.proxy_h2_frame_client import Client, goaway, raw

from embervm.proxy.h2.frame_layer import COMPRESSION_ERROR
from embervm.proxy.h2.hpack import HeaderDecoder, HpackError

# Blocks that made jh2 0.5.15 panic (found by feeding it random bytes): each one cut inside an
# integer or a string. With RUST_BACKTRACE set each wrote a backtrace of ~10 KB to stderr.
PANICKING = [b"j", b"\xa4\xa2>>\x0f", b"\xb90\xb3\x81\xb0\x9c\xa7\xff\x89", b"\xff\xd4\xde",
             b"?\xa8\xce\xf0", b"\x00\x85ab", b"@\x05na"]  # fmt: skip
A_A = b"\x00\x81\x1f\x81\x1f"  # a literal field a: a, both Huffman: 'a' is 00011, then 111


def decode(block: bytes) -> list[tuple[bytes, bytes]]:
    return HeaderDecoder(64 * 1024).decode(block)


def test_a_literal_in_huffman_with_its_padding_decodes() -> None:
    assert decode(A_A) == [(b"a", b"a")]


@pytest.mark.parametrize(
    "block",
    [
        b"\x00\x81\x18\x81\x1f",  # the name's padding is zeros, not the EOS prefix
        b"\x00\x81\x1f\x81\x1e",  # one padding bit is zero
        b"\x00\x82\x1f\xff\x81\x1f",  # 11 bits of padding
        b"\x82\x3f\xe1\x1f",  # a table size update after a field
        b"\x82\x20",
        b"\x80",  # index 0
        b"\xff\xff\xff\xff\xff\x0f",  # an integer of 2**35
    ],
)
def test_blocks_rfc_7541_refuses_are_refused(block: bytes) -> None:
    with pytest.raises(HpackError):
        decode(block)


def test_a_table_size_update_first_is_allowed() -> None:
    assert decode(b"\x3f\xe1\x1f\x82") == [(b":method", b"GET")]


def test_a_late_table_size_update_ends_the_connection() -> None:
    client = Client()
    client.read()
    client.server.receive(raw(0x1, 0x5, 1, b"\x82\x86\x84\x41\x01a\x20"))
    assert goaway(client.read()) == COMPRESSION_ERROR


names = st.binary(min_size=1, max_size=20).map(bytes.lower)
fields = st.lists(st.tuples(names, st.binary(max_size=60)), min_size=1, max_size=12)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(fields, min_size=1, max_size=4), st.booleans())
def test_what_an_encoder_writes_decodes_as_it_was(blocks: list[list[tuple[bytes, bytes]]],
                                                  huffman: bool) -> None:  # fmt: skip
    encoder, decoder = hpack.Encoder(), HeaderDecoder(64 * 1024)
    for block in blocks:
        assert decoder.decode(encoder.encode(block, huffman=huffman)) == block


@settings(max_examples=300, derandomize=True, deadline=None)
@given(fields, st.data())
def test_a_cut_or_mutated_block_is_decoded_or_refused(
    block: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    encoded = bytearray(hpack.Encoder().encode(block))
    cut = data.draw(st.integers(0, len(encoded)))
    for _ in range(data.draw(st.integers(0, 3))):
        if encoded:
            encoded[data.draw(st.integers(0, len(encoded) - 1))] = data.draw(st.integers(0, 255))
    refusal = ""
    try:
        decode(bytes(encoded[:cut]))
    except HpackError as exc:
        refusal = str(exc)
    assert "panic" not in refusal  # refused before jh2 could panic


def test_blocks_that_made_jh2_panic_write_nothing_to_stderr() -> None:
    script = (
        "import sys\n"
        "from embervm.proxy.h2.hpack import HeaderDecoder, HpackError\n"
        f"for block in {PANICKING!r}:\n"
        "    try:\n"
        "        HeaderDecoder(65536).decode(block)\n"
        "    except HpackError:\n"
        "        pass\n"
        "    else:\n"
        "        sys.exit(f'decoded {block!r}')\n"
    )
    env = {**os.environ, "RUST_BACKTRACE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env,
                         timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == b""
