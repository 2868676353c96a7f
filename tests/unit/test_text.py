import pytest

from raytrain_speech.batch import BLANK_ID
from raytrain_speech.data.text import CharTokenizer, TextError, normalize_text


def test_round_trip_and_normalisation():
    tok = CharTokenizer()
    ids = tok.encode("  Hello   World's ")
    assert BLANK_ID not in ids
    assert tok.decode(ids) == "hello world's"
    assert normalize_text("A\tB\n") == "a b"


@pytest.mark.parametrize("text, reason", [("", "empty"), ("   ", "empty"), ("héllo", "outside"), ("a1", "outside")])
def test_bad_transcripts(text, reason):
    with pytest.raises(TextError, match=reason):
        CharTokenizer().encode(text)
