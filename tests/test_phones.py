import json

import pytest

from neurostat.phones import ARPABET, BROAD_CLASSES, PHONES, PhoneMap, UnknownPhoneError


def test_vocabulary_shape():
    assert len(ARPABET) == 39 and len(set(ARPABET)) == 39
    assert PHONES[-2:] == ("sil", "spn")
    assert sorted(sum(BROAD_CLASSES.values(), ())) == sorted(ARPABET)
    assert [len(v) for v in BROAD_CLASSES.values()] == [15, 15, 9]


@pytest.mark.parametrize(
    "symbol, phone",
    [
        ("AH0", "AH"),
        ("AH1", "AH"),
        ("IY2", "IY"),
        ("ER0", "ER"),
        ("ah1", "AH"),
        ("T", "T"),
        ("NG", "NG"),
        ("", "sil"),
        ("sil", "sil"),
        ("sp", "sil"),
        ("spn", "spn"),
        ("<unk>", "spn"),
    ],
)
def test_stress_merge_and_specials(symbol, phone):
    assert PhoneMap()(symbol) == phone


@pytest.mark.parametrize("symbol", ["AH3", "XX", "ɑ", "AH01"])
def test_unknown_symbols_raise(symbol):
    with pytest.raises(UnknownPhoneError, match="unknown phone symbol"):
        PhoneMap()(symbol)


def test_mapping_files(tmp_path):
    tsv = tmp_path / "ipa.tsv"
    tsv.write_text("# IPA to ARPAbet\nɑ\tAA\nʃ\tSH\n")
    m = PhoneMap.from_file(tsv)
    assert m("ɑ") == "AA" and m("ʃ") == "SH" and m("AH1") == "AH"
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"ə": "AH"}))
    assert PhoneMap.from_file(js)("ə") == "AH"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ə": "SCHWA"}))
    with pytest.raises(ValueError, match="SCHWA"):
        PhoneMap.from_file(bad)
    broken = tmp_path / "b.tsv"
    broken.write_text("a b c\n")
    with pytest.raises(ValueError, match="b.tsv:1"):
        PhoneMap.from_file(broken)
