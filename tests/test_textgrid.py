import pytest

from neurostat.corpus.textgrid import Interval, TextGridError, parse_textgrid, read_textgrid, write_textgrid

LONG = '''File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = 1.5
tiers? <exists>
size = 2
item []:
    item [1]:
        class = "IntervalTier"
        name = "words"
        xmin = 0
        xmax = 1.5
        intervals: size = 2
        intervals [1]:
            xmin = 0
            xmax = 0.4
            text = ""
        intervals [2]:
            xmin = 0.4
            xmax = 1.5
            text = "SAY ""HI"""
    item [2]:
        class = "IntervalTier"
        name = "phones"
        xmin = 0
        xmax = 1.5
        intervals: size = 4
        intervals [1]:
            xmin = 0
            xmax = 0.4
            text = ""
        intervals [2]:
            xmin = 0.4
            xmax = 0.71
            text = "S"
        intervals [3]:
            xmin = 0.71
            xmax = 1.2
            text = "EY1"
        intervals [4]:
            xmin = 1.2
            xmax = 1.5
            text = "sil"
'''

SHORT = '''File type = "ooTextFile"
Object class = "TextGrid"

0
1.5
<exists>
2
"IntervalTier"
"words"
0
1.5
2
0
0.4
""
0.4
1.5
"SAY ""HI"""
"IntervalTier"
"phones"
0
1.5
4
0
0.4
""
0.4
0.71
"S"
0.71
1.2
"EY1"
1.2
1.5
"sil"
'''


def test_long_and_short_formats_agree():
    long, short = parse_textgrid(LONG), parse_textgrid(SHORT)
    assert long == short
    assert [i.text for i in long.tiers["phones"]] == ["", "S", "EY1", "sil"]
    assert long.tiers["words"][1].text == 'SAY "HI"'
    assert long.tiers["phones"][2] == Interval(0.71, 1.2, "EY1")
    assert long.xmax == 1.5


def test_utf16_file_and_round_trip(tmp_path):
    p = tmp_path / "a.TextGrid"
    p.write_bytes(SHORT.encode("utf-16"))
    assert read_textgrid(p) == parse_textgrid(LONG)
    q = tmp_path / "b.TextGrid"
    write_textgrid(q, 1.5, parse_textgrid(LONG).tiers)
    assert read_textgrid(q) == parse_textgrid(LONG)


def test_point_tier_is_read():
    text = SHORT.replace(
        '"IntervalTier"\n"words"\n0\n1.5\n2\n0\n0.4\n""\n0.4\n1.5\n"SAY ""HI"""',
        '"TextTier"\n"marks"\n0\n1.5\n1\n0.7\n"x"',
    )
    grid = parse_textgrid(text)
    assert grid.tiers["marks"] == [Interval(0.7, 0.7, "x")]


@pytest.mark.parametrize(
    "change, message",
    [
        (("xmin = 0.71\n            xmax = 1.2", "xmin = 0.6\n            xmax = 1.2"), "overlapping"),
        (("xmin = 0.71\n            xmax = 1.2", "xmin = 0.3\n            xmax = 1.2"), "unsorted"),
        (('Object class = "TextGrid"', 'Object class = "Pitch"'), "not a Praat text TextGrid"),
        (("intervals: size = 4", "intervals: size = 9"), "unexpected end"),
        (
            ('class = "IntervalTier"\n        name = "phones"', 'class = "Weird"\n        name = "phones"'),
            "unknown tier class",
        ),
    ],
)
def test_invalid_textgrids_raise_with_name(change, message):
    with pytest.raises(TextGridError, match=message) as err:
        parse_textgrid(LONG.replace(*change), "bad.TextGrid")
    assert "bad.TextGrid" in str(err.value)


def test_unreadable_file_names_it(tmp_path):
    p = tmp_path / "x.TextGrid"
    p.write_bytes(b"\xff\x00garbage\x80")
    with pytest.raises(TextGridError, match="x.TextGrid"):
        read_textgrid(p)


def test_the_fast_long_format_reader_finds_what_the_tokenizer_finds():
    """On long-format texts cut and sprinkled with quotes, brackets, equals signs and number pieces (``=`` inside
    strings, unclosed quotes and brackets, values after flags), the one-pass reader gives the tokenizer's
    values exactly, or hands the text to it (None) where a quote or bracket never closes."""
    import random

    from neurostat.corpus.textgrid import _long_values, _values

    rng = random.Random(0)
    pieces = ['"', "[", "]", "=", " ", "\n", "-", "5", ".", "e", "a", '""', "<exists>", "1.5e3", "\t", '"x = 2"']
    handed_over = 0
    for _ in range(4000):
        text = list(LONG[: rng.randrange(20, len(LONG) + 1)])
        for _ in range(rng.randrange(0, 8)):
            text.insert(rng.randrange(len(text) + 1), rng.choice(pieces))
        text = "".join(text)
        fast = _long_values(text)
        handed_over += fast is None
        assert fast is None or fast == _values(text, True), text
    assert _long_values(LONG) == _values(LONG, True) and 200 < handed_over < 3000
