"""JSON schemas (issue #16, part 5): ``json_schema=`` through llama.cpp's
schema-to-grammar converter, valid documents, and losslessness: under the same schema
MTP's greedy output is Session's, token for token."""
import json

import pytest

import mtp_cy
from conftest import prompt_of

# bounded everywhere: a synthetic model prefers words to a closing quote, so an
# unbounded string would run to max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "word": {"type": "string", "enum": ["sea", "sky", "moon"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "free": {"type": "string", "maxLength": 24},
    },
    "required": ["word", "n", "ok", "tags", "free"],
    "additionalProperties": False,
}


def check_document(text, schema=SCHEMA):
    doc = json.loads(text)
    try:
        import jsonschema
    except ImportError:
        assert set(doc) == set(schema["required"])
        assert doc["word"] in ("sea", "sky", "moon") and 0 <= doc["n"] <= 99 and isinstance(doc["ok"], bool)
        assert len(doc["tags"]) <= 3 and len(doc["free"]) <= 24
    else:
        jsonschema.validate(doc, schema)
    return doc


@pytest.fixture(scope="module")
def engines(mtp_model):
    d = {"session": mtp_cy.Session(mtp_model, n_ctx=512, n_threads=1),
         "mtp1": mtp_cy.MTP(mtp_model, n_draft=1, n_ctx=512, n_threads=1),
         "mtp3": mtp_cy.MTP(mtp_model, n_draft=3, n_ctx=512, n_threads=1),
         "auto": mtp_cy.MTP(mtp_model, n_draft="auto", n_ctx=512, n_threads=1)}
    yield d
    for e in d.values():
        e.close()


def test_converter():
    g = mtp_cy.json_schema_to_grammar(SCHEMA)
    assert "root ::=" in g and '"\\"sea\\""' in g
    assert mtp_cy.json_schema_to_grammar(json.dumps(SCHEMA)) == g
    assert mtp_cy.json_schema_to_grammar(json.dumps(SCHEMA).encode()) == g
    with pytest.raises(ValueError, match="invalid JSON schema"):
        mtp_cy.json_schema_to_grammar({"type": "nonsense"})
    with pytest.raises(ValueError, match="cannot resolve"):
        mtp_cy.json_schema_to_grammar({"$ref": "#/definitions/nope"})
    with pytest.raises(ValueError, match="invalid JSON schema"):
        mtp_cy.json_schema_to_grammar("{not json")
    with pytest.raises(TypeError, match="JSON-serializable"):
        mtp_cy.json_schema_to_grammar({"x": object()})


@pytest.mark.parametrize("start", [0, 7, 20])
def test_mtp_output_is_session_output_under_a_schema(engines, mtp_sm, start):
    p = prompt_of(mtp_sm, 3, start)
    ref = engines["session"].complete(p, json_schema=SCHEMA, temp=0, max_tokens=200)
    assert ref.stop_reason == "eog"         # the grammar ends with the document
    check_document(ref.text)
    got = {}
    for name in ("mtp1", "mtp3", "auto"):
        c = got[name] = engines[name].complete(p, json_schema=SCHEMA, temp=0, max_tokens=200)
        assert (c.tokens, c.text, c.stop_reason) == (ref.tokens, ref.text, ref.stop_reason), name
    # drafts were made and some accepted (inside the free-text string the greedy words are allowed)
    assert got["mtp3"].stats["drafts_accepted"] > 0 and got["mtp1"].stats["drafts_accepted"] > 0


def test_schema_forms_and_streams_agree(engines, mtp_sm):
    e = engines["mtp3"]
    p = prompt_of(mtp_sm, 3, 4)
    ref = e.complete(p, json_schema=SCHEMA, temp=0, max_tokens=200)
    assert e.complete(p, json_schema=json.dumps(SCHEMA), temp=0, max_tokens=200).tokens == ref.tokens
    g = mtp_cy.json_schema_to_grammar(SCHEMA)
    assert e.complete(p, grammar=g, temp=0, max_tokens=200).tokens == ref.tokens
    events = list(e.stream_events(p, json_schema=SCHEMA, temp=0, max_tokens=200))
    assert events[-1] == ("eog", None)
    assert "".join(x[2] for x in events if x[0] == "token") == ref.text
    assert "".join(e.stream(p, json_schema=SCHEMA, temp=0, max_tokens=200)) == ref.text
    # sampling at a temperature stays inside the schema
    for seed in (1, 2):
        check_document(e.complete(p, json_schema=SCHEMA, temp=1.5, seed=seed, max_tokens=200).text)


def test_schema_errors(engines, mtp_sm):
    e = engines["session"]
    p = prompt_of(mtp_sm, 2)
    with pytest.raises(ValueError, match="either grammar= or json_schema="):
        e.complete(p, json_schema=SCHEMA, grammar='root ::= "x"')
    with pytest.raises(ValueError, match="invalid JSON schema"):
        e.complete(p, json_schema={"type": "nonsense"})
    with pytest.raises(TypeError):
        e.complete(p, json_schema=object())
    assert e.generate(p, max_tokens=3, temp=0) == mtp_sm.greedy(p, 3).text
