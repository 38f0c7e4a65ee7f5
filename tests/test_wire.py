from __future__ import annotations

import pytest

from p2plb.errors import RequestError
from p2plb.wire import (
    ItemsBody,
    RegisterBody,
    check_address,
    check_indexer_id,
    check_item,
    check_name,
    check_whole_number,
    decode_body,
    decode_percent,
    encode,
)


def rejected(call, *args, **kwargs) -> RequestError:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"", "invalid_json", "body: expected a JSON object, got nothing"),
        (b"{", "invalid_json", "body: not valid JSON (Input data was truncated)"),
        (
            b"[1]",
            "invalid_json",
            "body: expected a JSON object (Expected `object`, got `array`)",
        ),
        (b'{"item": 1}', "invalid_field", "item: expected `str`, got `int`"),
        (b'{"items": "a"}', "invalid_field", "items: expected `array`, got `str`"),
        (b'{"items": ["a", 2]}', "invalid_field", "items: expected `str`, got `int`"),
        (b'{"item": "a", "x": 1}', "unknown_field", "x: unknown field"),
        (
            b'{"item": "a", "items": ["b"]}',
            "invalid_field",
            'item: give exactly one of "item" or "items"',
        ),
        (b"{}", "invalid_field", 'item: give exactly one of "item" or "items"'),
        (b'{"items": []}', "invalid_field", "items: must hold at least one item"),
        (b'{"item": ""}', "invalid_field", "item: must not be empty"),
        (
            b'{"item": "a\\u0000b"}',
            "invalid_field",
            "item: must not contain NUL characters",
        ),
        (
            b'{"item": "\\ud800"}',
            "invalid_json",
            "body: not valid JSON (it holds a \\u escape of a lone surrogate, "
            "which is not UTF-8)",
        ),
        (
            b'{"item": "\xff"}',
            "invalid_json",
            "body: not valid JSON (Invalid UTF-8 encoded string)",
        ),
        (b'{"items": ["ok", ""]}', "invalid_field", "items: must not be empty"),
    ],
)
def test_items_body_rejections(body: bytes, code: str, message: str) -> None:
    def decode() -> list[str]:
        return decode_body(body, ItemsBody).values()

    error = rejected(decode)
    assert (error.status, error.code, error.message) == (400, code, message)


def test_items_body_accepts_one_or_a_batch() -> None:
    assert decode_body(b'{"item": "x"}', ItemsBody).values() == ["x"]
    assert decode_body(b'{"items": ["a", "b"]}', ItemsBody).values() == ["a", "b"]
    assert decode_body('{"item": "日本語 🎵"}'.encode(), ItemsBody).values() == [
        "日本語 🎵"
    ]


def test_item_size_is_counted_in_utf8_bytes() -> None:
    assert check_item("é" * 2048) == "é" * 2048
    error = rejected(check_item, "é" * 2049)
    assert error.message == "item: must be at most 4096 bytes of UTF-8, got 4098"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "name: must not be empty"),
        ("x" * 257, "name: must be at most 256 characters, got 257"),
        ("x" * 10_000, "name: must be at most 256 characters, got 10000"),
        ("a/b", "name: must not contain '/'"),
        ("a\x00b", "name: must not contain control characters (found '\\x00')"),
        ("tab\there", "name: must not contain control characters (found '\\t')"),
        ("\x7f", "name: must not contain control characters (found '\\x7f')"),
        ("\udfff", "name: must be valid UTF-8 (it holds a lone surrogate)"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    error = rejected(check_name, name)
    assert (error.status, error.code, error.message) == (400, "invalid_field", message)


def test_good_names() -> None:
    for name in ("songs", "x" * 256, "歌曲", "música 🎶", "a b.c-d_e:f"):
        assert check_name(name) == name


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("http://127.0.0.1:7401", "http://127.0.0.1:7401"),
        ("HTTP://LocalHost:80/", "http://localhost:80"),
        ("https://idx.example:443", "https://idx.example:443"),
        ("http://[2001:db8::1]:9000", "http://[2001:db8::1]:9000"),
    ],
)
def test_good_addresses(given: str, normalised: str) -> None:
    assert check_address(given) == normalised


@pytest.mark.parametrize(
    "address",
    [
        "2001:db8::1:9000",
        "127.0.0.1:80",
        "ftp://x:1",
        "http://x:70000",
        "http://x:0",
        "http://x",
        "http://x:80/path",
        "http://x:80?q=1",
        "http://user:pw@x:80",
        "http://:80",
        "",
    ],
)
def test_bad_addresses(address: str) -> None:
    error = rejected(check_address, address)
    assert error.code == "invalid_field"
    assert error.message.startswith(
        f"address: must be http://host:port or https://host:port, got {address!r}"
    )


_EXPECTED = "address: must be http://host:port or https://host:port, got "
_NOT_A_HOST = (
    ": the host must be a DNS name, an IPv4 address or an IPv6 address in brackets"
)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("http://127.0.0.1\x00:80", ": no spaces or control characters"),
        ("http://exa mple:80", ": no spaces or control characters"),
        # urlsplit would drop these silently and accept what is left.
        ("http://exa\nmple:80", ": no spaces or control characters"),
        ("http://x:80\t", ": no spaces or control characters"),
        (" http://x:80", ": no spaces or control characters"),
        ("http://x\x1b:80", ": no spaces or control characters"),
        ("http://a\u00a0b:80", ": no spaces or control characters"),
        ("http://bücher.example:80", _NOT_A_HOST),
        ("http://a\u200bb:80", _NOT_A_HOST),
        ("http://ex%41mple:80", _NOT_A_HOST),
        ("http://a!b:80", _NOT_A_HOST),
        ("http://-x:80", _NOT_A_HOST),
        ("http://x-:80", _NOT_A_HOST),
        ("http://a..b:80", _NOT_A_HOST),
        ("http://" + "a" * 64 + ".example:80", _NOT_A_HOST),
        ("http://" + "a." * 127 + "ab:80", _NOT_A_HOST),
        ("http://999.1.1.1:80", _NOT_A_HOST),
        ("http://1.2.3:80", _NOT_A_HOST),
        ("http://0x7f.1:80", _NOT_A_HOST),
        ("http://8080:80", _NOT_A_HOST),
    ],
)
def test_an_address_host_is_a_name_or_an_ip_address(address: str, reason: str) -> None:
    error = rejected(check_address, address)
    assert (error.status, error.code, error.message) == (
        400,
        "invalid_field",
        f"{_EXPECTED}{address!r}{reason}",
    )


def test_hosts_that_are_names_or_ip_addresses() -> None:
    for given in (
        "http://my_service:80",
        "http://a-b.c1.example.:80",
        "http://1e3:80",
        "http://10.0.0.1:80",
        "http://[::ffff:10.0.0.1]:80",
        "http://" + "a" * 63 + ".example:80",
    ):
        assert check_address(given) == given


def test_address_must_be_a_string() -> None:
    error = rejected(check_address, 80)
    assert error.message == "address: must be a string like http://host:port, got 80"


@pytest.mark.parametrize(
    "value", ["", "a" * 129, "a b", "a/b", "é", "nl\n", "\nnl", 5, None]
)
def test_bad_indexer_ids(value: object) -> None:
    error = rejected(check_indexer_id, value)
    assert error.message == (
        f"id: must be 1 to 128 of letters, digits, '.', '_', ':', '-'; got {value!r}"
    )


@pytest.mark.parametrize("value", [".", ".."])
def test_dot_segments_are_not_indexer_ids(value: str) -> None:
    error = rejected(check_indexer_id, value)
    assert (error.status, error.code, error.message) == (
        400,
        "invalid_field",
        f"id: must not be {value!r}, which a URL path drops as a dot segment",
    )


def test_good_indexer_ids() -> None:
    for value in ("i1", "a" * 128, "node-1.zone_a:7401", "...", ".a", "a."):
        assert check_indexer_id(value) == value


@pytest.mark.parametrize(
    ("zone", "message"),
    [
        ("\x1b[31mred", "zone: must not contain control characters (found '\\x1b')"),
        ("eu\nwest", "zone: must not contain control characters (found '\\n')"),
        ("", "zone: must be 1 to 64 characters"),
    ],
)
def test_zones_hold_no_control_characters(zone: str, message: str) -> None:
    body = {"id": "i1", "address": "http://x:1", "capacity": 1, "zone": zone}

    error = rejected(decode_body(encode(body), RegisterBody).check)

    assert (error.status, error.code, error.message) == (400, "invalid_field", message)


def test_a_zone_may_be_any_printable_text() -> None:
    body = {"id": "i1", "address": "http://x:1", "capacity": 1, "zone": "eu-west 1 ☁"}
    assert decode_body(encode(body), RegisterBody).check().zone == "eu-west 1 ☁"


@pytest.mark.parametrize(
    "raw",
    ["", " 5", "5 ", "+5", "-1", "1_0", "1.5", "1e3", "0x10", "\u0663", "\u00b2",
     "\uff15", "0", "10001", "9" * 5000],
)  # fmt: skip
def test_whole_numbers_are_ascii_digits_in_range(raw: str) -> None:
    error = rejected(check_whole_number, raw, "limit", 1, 10_000)
    assert (error.status, error.code, error.message) == (
        400,
        "invalid_field",
        f"limit: must be a whole number from 1 to 10000, got {raw!r}",
    )


def test_whole_numbers() -> None:
    assert check_whole_number("1", "limit", 1, 10_000) == 1
    assert check_whole_number("10000", "limit", 1, 10_000) == 10_000
    assert check_whole_number("0" * 5000 + "7", "limit", 1, 10_000) == 7
    assert check_whole_number("0", "members_since", 0, 2**63 - 1) == 0
    error = rejected(check_whole_number, "0", "refresh", 1, 60, unit="seconds")
    assert (
        error.message
        == "refresh: must be a whole number of seconds from 1 to 60, got '0'"
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("%FF", "%FF does not decode as UTF-8"),
        ("ok%FE%FF", "%FE does not decode as UTF-8"),
        ("%ED%A0%80", "%ED does not decode as UTF-8"),  # a lone surrogate
        ("%C0%AF", "%C0 does not decode as UTF-8"),  # an overlong '/'
        ("%C3", "%C3 does not decode as UTF-8"),  # cut short
        ("%zz", "'%zz' is not an escape"),
        ("a%2", "'%2' is not an escape"),
        ("50%", "'%' is not an escape"),
    ],
)
def test_percent_decoding_is_strict(raw: str, reason: str) -> None:
    error = rejected(decode_percent, raw, "name")
    assert (error.status, error.code, error.message) == (
        400,
        "invalid_field",
        f"name: must be percent-encoded UTF-8; {reason}",
    )


def test_percent_decoding() -> None:
    assert decode_percent("%25FF", "name") == "%FF"
    assert decode_percent("%C3%a9t%C3%A9", "name") == "été"
    assert decode_percent("a+b%2B", "name") == "a+b+"  # '+' is a space in queries only
    assert decode_percent("%F0%9F%8E%B5", "name") == "🎵"
    assert decode_percent("", "name") == ""
