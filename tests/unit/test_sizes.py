import pytest

from deployments.sizes import parse_size

RULES = {"default": "64x48", "multiple": 16, "max_pixels": 512 * 512}


def test_explicit_size_is_width_by_height():
    assert parse_size("96x32", **RULES) == (96, 32)


def test_auto_means_the_models_default():
    assert parse_size("auto", **RULES) == (64, 48)


def test_largest_allowed_size_passes():
    assert parse_size("512x512", **RULES) == (512, 512)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1024", "WIDTHxHEIGHT"),
        ("64X64", "WIDTHxHEIGHT"),
        ("64x64x3", "WIDTHxHEIGHT"),
        ("-64x64", "WIDTHxHEIGHT"),
        ("0x64", "WIDTHxHEIGHT"),
        (" 64x64", "WIDTHxHEIGHT"),
        ("64x64\n", "WIDTHxHEIGHT"),
        ("１２８x64", "WIDTHxHEIGHT"),  # non-ASCII digits
        ("99999999x16", "WIDTHxHEIGHT"),
        ("", "WIDTHxHEIGHT"),
        ("60x64", "multiples of 16"),
        ("64x8", "multiples of 16"),
        ("528x512", "at most 262144"),
    ],
)
def test_bad_sizes_say_why(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_size(text, **RULES)
