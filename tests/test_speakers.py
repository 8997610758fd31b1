import pytest

from neurostat.corpus.speakers import SpeakersError, read_speakers

SPEAKERS = """; LibriSpeech speakers
;ID      |SEX| SUBSET           |MINUTES| NAME
14       | F | train-clean-360  | 25.03 | Kristin LeMoine
16       | F | train-clean-360  | 25.11 | Alys AtteWater
60   |M|train-clean-100|20.18|||Ex-Name with pipes|
  1688   | m | dev-clean        | 8.0 | Jean-Loup Ébrard

"""


def test_speakers_quirks(tmp_path):
    p = tmp_path / "SPEAKERS.TXT"
    p.write_text(SPEAKERS, encoding="utf-8")
    s = read_speakers(p)
    assert set(s) == {"14", "16", "60", "1688"}
    assert s["14"].sex == "F" and s["14"].name == "Kristin LeMoine" and s["14"].minutes == 25.03
    assert s["60"].sex == "M" and s["60"].name == "||Ex-Name with pipes|"
    assert s["1688"].sex == "M" and s["1688"].subset == "dev-clean"


@pytest.mark.parametrize(
    "line, message",
    [
        ("99 | X | dev-clean | 1.0 | Who", "sex must be M or F"),
        ("99 | F | dev-clean | lots | Who", "not a number"),
        ("99 F dev-clean", "expected"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "SPEAKERS.TXT"
    p.write_text("; header\n" + line + "\n")
    with pytest.raises(SpeakersError, match=message) as err:
        read_speakers(p)
    assert "SPEAKERS.TXT:2" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpeakersError, match="not found"):
        read_speakers(tmp_path / "SPEAKERS.TXT")
