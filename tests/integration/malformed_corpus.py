"""malformed_corpus — bad job messages (and tricky good ones) for test_malformed.

Every case is published raw, byte for byte, on a jobs.<service>.<priority>.
<type> subject of the service "work". Bodies may hold the placeholder @ID@,
(or @ID:N@, the same padded to N bytes), which render() replaces with an id
that is fresh for every round (and is then also sent as Nats-Msg-Id, the way
a real publisher would); bodies without it
are sent without Nats-Msg-Id, so JOBS stores each round's copy again.

BAD: (kind, subject, body, reason, error) — reason is the Jetfleet-Reason the
dead letter must carry ("invalid" or "expired") and error a regular expression
the Jetfleet-Error header must match (it names the problem); HEADERS: the
headers a few of them are published with.
GOOD: (kind, subject, body) — valid envelopes near the edges of the rules,
which must be processed and acknowledged, never dead-lettered.
"""

import json
import re

SERVICE = "work"
S = "jobs.work.normal.t"
S_HIGH = "jobs.work.high.t"
S_LOW = "jobs.work.low.t"


def env(id_=b'"@ID@"', service=b'"work"', type_=b'"t"', payload=b"{}", extra=b"", **fields):
    """A raw envelope: each argument is the JSON text of its member (None
    leaves the member out); fields adds members as raw JSON text too."""
    parts = []
    for key, raw in (("id", id_), ("service", service), ("type", type_)):
        if raw is not None:
            parts.append(b'"%s":%s' % (key.encode(), raw))
    for key, raw in fields.items():
        parts.append(b'"%s":%s' % (key.encode(), raw))
    if payload is not None:
        parts.append(b'"payload":' + payload)
    return b"{" + b",".join(parts) + extra + b"}"


def _s(text):
    return json.dumps(text).encode()


NOT_JSON = r"^not JSON: "
# What the consumer adds to the error of a dead letter without the body.
BODY_LEFT_OUT = r".* \[body of \d+ bytes left out"
OK_ENV = env()

# The top-level object is level 1: a payload of 63 nested arrays is level 64
# (the most allowed), one more is too deep.
DEEP_OK = b"[" * 63 + b"]" * 63
DEEP_65 = b"[" * 64 + b"]" * 64
DEEP_OBJ_65 = b'{"a":' * 64 + b"1" + b"}" * 64


def bad_cases(max_payload):
    """The malformed corpus, for a server whose max_payload is given."""
    big_filler = max_payload - 160  # fits JOBS; with dead-letter headers it does not
    cases = [
        # --- not JSON at all, or broken JSON
        ("empty body", S, b"", "invalid", r"^empty message$"),
        ("empty body with a Status: 408 header", S_LOW, b"", "invalid", r"^empty message$"),
        ("whitespace only", S, b" \r\n\t ", "invalid", NOT_JSON),
        ("plain text", S, b"please run job 7", "invalid", NOT_JSON),
        ("XML", S, b"<job id='x' service='work'/>", "invalid", NOT_JSON),
        ("single-quoted strings", S, b"{'id':'@ID@','service':'work','type':'t','payload':{}}",
         "invalid", NOT_JSON),
        ("unquoted keys", S, b'{id:"@ID@",service:"work",type:"t",payload:{}}', "invalid",
         NOT_JSON),
        ("trailing comma in object", S, env(extra=b","), "invalid", NOT_JSON),
        ("comment", S, OK_ENV[:-1] + b"/* hi */}", "invalid", NOT_JSON),
        ("Infinity in payload", S, env(payload=b"Infinity"), "invalid", NOT_JSON),
        ("-Infinity in payload", S, env(payload=b"[-Infinity]"), "invalid", NOT_JSON),
        ("hex number", S, env(payload=b"0x1F"), "invalid", NOT_JSON),
        ("leading zero", S, env(payload=b"012"), "invalid", NOT_JSON),
        ("plus sign", S, env(payload=b"+1"), "invalid", NOT_JSON),
        ("bare minus", S, env(payload=b"-"), "invalid", NOT_JSON),
        ("fraction without digits", S, env(payload=b"1."), "invalid", NOT_JSON),
        ("truncated in a string", S, OK_ENV[:9], "invalid", NOT_JSON),
        ("truncated before the last brace", S, OK_ENV[:-1], "invalid", NOT_JSON),
        ("truncated after a colon", S, b'{"id":"@ID@","service":', "invalid", NOT_JSON),
        ("truncated \\u escape", S, b'{"id":"@ID@","service":"work","type":"t","payload":"\\u00',
         "invalid", NOT_JSON),
        ("truncated UTF-8 at the end", S, b'{"id":"@ID@","payload":"\xe2\x82', "invalid",
         NOT_JSON),
        # --- top level is not an object
        ("top-level array", S, b"[" + OK_ENV + b"]", "invalid", r"top level is an array"),
        ("top-level string", S, _s(OK_ENV.decode()), "invalid", r"top level is a string"),
        ("top-level number", S, b"42", "invalid", r"top level is a number"),
        ("top-level true", S, b"true", "invalid", r"top level is a boolean"),
        ("top-level null", S, b"null", "invalid", r"top level is null"),
        # --- nesting
        ("nesting 65 deep (arrays)", S, env(payload=DEEP_65), "invalid",
         r"nesting deeper than 64 levels"),
        ("nesting 65 deep (objects)", S, env(payload=DEEP_OBJ_65), "invalid",
         r"nesting deeper than 64 levels"),
        ("nesting 100000 deep, unclosed", S, env(payload=b"[" * 100000)[:-1], "invalid",
         r"nesting deeper than 64 levels"),
        # --- invalid UTF-8
        ("overlong 2-byte sequence in id", S, env(id_=b'"@ID@-\xc0\xaf"'), "invalid", NOT_JSON),
        ("overlong 3-byte sequence in payload", S, env(payload=b'"\xe0\x80\xaf"'), "invalid",
         NOT_JSON),
        ("UTF-8 encoded surrogate in type", S, env(type_=b'"t\xed\xa0\x80"'), "invalid", NOT_JSON),
        ("truncated sequence mid-string", S, env(id_=b'"@ID@-\xe2\x82x"'), "invalid", NOT_JSON),
        ("code point above U+10FFFF", S, env(payload=b'"\xf4\x90\x80\x80"'), "invalid", NOT_JSON),
        ("stray continuation byte in tenant", S, env(tenant=b'"ac\x80me"'), "invalid", NOT_JSON),
        ("0xFF between tokens", S, OK_ENV[:-1] + b"\xff}", "invalid", NOT_JSON),
        ("Latin-1 body", S, env(payload=b'"caf\xe9"'), "invalid", NOT_JSON),
        ("UTF-16LE body with BOM", S, b"\xff\xfe" + OK_ENV.decode().encode("utf-16-le"),
         "invalid", r"^not JSON: NUL byte at byte 3$"),
        # --- NUL bytes
        # jansson's own words for these were "end of file expected near end of
        # file" and "invalid token near end of file".
        ("raw NUL in id", S, env(id_=b'"@ID@\x00x"'), "invalid",
         r"^not JSON: NUL byte at byte \d+$"),
        ("raw NUL after the object", S, OK_ENV + b"\x00", "invalid",
         r"^not JSON: NUL byte at byte \d+$"),
        ("raw NUL before the object", S, b"\x00" + OK_ENV, "invalid",
         r"^not JSON: NUL byte at byte 0$"),
        ("\\u0000 in id", S, env(id_=b'"@ID@\\u0000x"'), "invalid",
         r"^id: control character U\+0000"),
        ("\\u0000 in service", S, env(service=b'"work\\u0000"'), "invalid",
         r"^service: .* is not a subject token"),
        ("\\u0000 in priority", S, env(priority=b'"normal\\u0000x"'), "invalid",
         r"^priority: .* is not one of high, normal, low"),
        # --- duplicate keys
        ("duplicate top-level key", S, env(extra=b',"service":"work"'), "invalid",
         r"duplicate object key"),
        ("duplicate key in payload", S, env(payload=b'{"a":1,"b":2,"a":3}'), "invalid",
         r"duplicate object key"),
        ("duplicate key three levels down", S, env(payload=b'{"x":{"y":{"k":1,"k":1}}}'),
         "invalid", r"duplicate object key"),
        ("duplicate key spelt with an escape", S, env(extra=b',"\\u0069d":"other"'), "invalid",
         r"duplicate object key"),
        # --- wrong types and values, field by field
        ("id is a number", S, env(id_=b"12345"), "invalid", r"^id: must be a string, not a number"),
        ("id is null", S, env(id_=b"null"), "invalid", r"^id: must be a string, not null"),
        ("id is an object", S, env(id_=b'{"v":"@ID@"}'), "invalid",
         r"^id: must be a string, not an object"),
        ("service is null", S, env(service=b"null"), "invalid",
         r"^service: must be a string, not null"),
        ("service is a number", S, env(service=b"7"), "invalid",
         r"^service: must be a string, not a number"),
        ("service has a dot", S, env(service=b'"work.x"'), "invalid",
         r"^service: .* is not a subject token"),
        ("service missing", S, env(service=None), "invalid", r"^service: missing"),
        ("type is an array", S, env(type_=b'["t"]'), "invalid",
         r"^type: must be a string, not an array"),
        ("type empty", S, env(type_=b'""'), "invalid", r"^type: .* is not a subject token"),
        ("type missing", S, env(type_=None), "invalid", r"^type: missing"),
        ("priority unknown", S, env(priority=b'"urgent"'), "invalid",
         r"^priority: \"urgent\" is not one of"),
        ("priority upper case", S_HIGH, env(priority=b'"HIGH"'), "invalid",
         r"^priority: \"HIGH\" is not one of"),
        ("priority is a number", S, env(priority=b"1"), "invalid",
         r"^priority: must be a string, not a number"),
        ("tenant empty", S, env(tenant=b'""'), "invalid", r"^tenant: empty"),
        ("tenant is a number", S, env(tenant=b"9"), "invalid",
         r"^tenant: must be a string, not a number"),
        ("tenant is null", S, env(tenant=b"null"), "invalid",
         r"^tenant: must be a string, not null"),
        ("tenant 201 bytes", S, env(tenant=_s("t" * 201)), "invalid",
         r"^tenant: longer than 200 bytes"),
        ("tenant with ESC", S, env(tenant=b'"ac\\u001bme"'), "invalid",
         r"^tenant: control character U\+001B"),
        ("payload missing", S, env(payload=None), "invalid", r"^payload: missing"),
        ("created_at is a number", S, env(created_at=b"1764000000"), "invalid",
         r"^created_at: must be a string, not a number"),
        ("deadline is an object", S, env(deadline=b"{}"), "invalid",
         r"^deadline: must be a string, not an object"),
        # --- numbers jansson cannot hold
        ("integer beyond int64", S, env(payload=b"99999999999999999999"), "invalid",
         r"^not JSON: too big integer"),
        ("integer below int64", S, env(payload=b"[-9223372036854775809]"), "invalid",
         r"^not JSON: too big negative integer"),
        ("1e400", S, env(payload=b"1e400"), "invalid", r"^not JSON: real number overflow"),
        ("-1e400 nested", S, env(payload=b'{"x":[-1e400]}'), "invalid",
         r"^not JSON: real number overflow"),
        # --- subject and envelope disagree
        ("service differs from subject", S, env(service=b'"other"'), "invalid",
         r"^subject jobs\.work\.normal\.t does not match envelope \(service other"),
        ("priority differs from subject", S_HIGH, env(priority=b'"low"'), "invalid",
         r"^subject jobs\.work\.high\.t does not match envelope \(service work, priority low"),
        ("priority absent on a high subject", S_HIGH, OK_ENV, "invalid",
         r"^subject jobs\.work\.high\.t does not match envelope \(service work, priority normal"),
        ("type differs from subject", S_LOW, env(type_=b'"u"', priority=b'"low"'), "invalid",
         r"does not match envelope \(service work, priority low, type u\)"),
        ("subject with an extra token", "jobs.work.normal.t.extra", OK_ENV, "invalid",
         r"^subject jobs\.work\.normal\.t\.extra is not jobs\.<service>\.<priority>\.<type>"),
        # Its dead letter's subject did not fit a 1 KiB buffer: NAKed for
        # redelivery every 30 s, forever, and never dead-lettered.
        ("type token of 1100 bytes in the subject", "jobs.work.normal." + "x" * 1100, OK_ENV,
         "invalid", r"^subject jobs\.work\.normal\.x+ does not match envelope"),
        # --- id
        ("id missing", S, env(id_=None), "invalid", r"^id: missing"),
        ("id empty", S, env(id_=b'""'), "invalid", r"^id: empty"),
        ("id 201 bytes", S, env(id_=b'"@ID:201@"'), "invalid",
         r"^id: longer than 200 bytes \(201\)"),
        ("id of 67 three-byte characters (201 bytes)", S, env(id_=_s("\u20ac" * 67)), "invalid",
         r"^id: longer than 200 bytes \(201\)"),
        ("id with \\u0001", S, env(id_=b'"@ID@\\u0001"'), "invalid",
         r"^id: control character U\+0001"),
        ("id with an escaped tab", S, env(id_=b'"@ID@\\t1"'), "invalid",
         r"^id: control character U\+0009"),
        ("id with a raw tab", S, env(id_=b'"@ID@\t1"'), "invalid", NOT_JSON),
        ("id with DEL", S, env(id_=b'"@ID@\\u007f"'), "invalid", r"^id: control character U\+007F"),
        ("id with C1 NEL", S, env(id_=b'"@ID@\\u0085"'), "invalid",
         r"^id: control character U\+0085"),
        ("id with a lone high surrogate", S, env(id_=b'"@ID@\\ud800"'), "invalid", NOT_JSON),
        ("id with a lone low surrogate", S, env(id_=b'"@ID@\\udc00x"'), "invalid", NOT_JSON),
        # --- dates
        ("created_at on Feb 30", S, env(created_at=b'"2026-02-30T10:00:00Z"'), "invalid",
         r"^created_at: \"2026-02-30T10:00:00Z\" is not an RFC 3339 date-time"),
        ("deadline on Feb 29 of 2027", S, env(deadline=b'"2027-02-29T10:00:00Z"'), "invalid",
         r"^deadline: .* is not an RFC 3339 date-time"),
        ("created_at without offset", S, env(created_at=b'"2026-11-22T10:00:00"'), "invalid",
         r"^created_at: .* is not an RFC 3339 date-time with offset"),
        ("deadline garbage", S, env(deadline=b'"soon"'), "invalid",
         r"^deadline: \"soon\" is not an RFC 3339"),
        ("deadline garbage in the past", S, env(deadline=b'"last tuesday"'), "invalid",
         r"^deadline: \"last tuesday\" is not an RFC 3339"),
        ("created_at at hour 24", S, env(created_at=b'"2026-11-22T24:00:00Z"'), "invalid",
         r"^created_at: "),
        ("created_at with offset +24:00", S, env(created_at=b'"2026-11-22T10:00:00+24:00"'),
         "invalid", r"^created_at: "),
        ("created_at with a space for T", S, env(created_at=b'"2026-11-22 10:00:00Z"'), "invalid",
         r"^created_at: "),
        ("deadline date only", S, env(deadline=b'"2999-12-01"'), "invalid", r"^deadline: "),
        ("created_at without seconds", S, env(created_at=b'"2026-11-22T10:00Z"'), "invalid",
         r"^created_at: "),
        ("created_at with an empty fraction", S, env(created_at=b'"2026-11-22T10:00:00.Z"'),
         "invalid", r"^created_at: "),
        ("created_at with offset without colon", S, env(created_at=b'"2026-11-22T10:00:00+0100"'),
         "invalid", r"^created_at: "),
        # --- passed deadlines (valid envelopes otherwise)
        ("deadline passed (Z)", S, env(deadline=b'"2001-01-01T00:00:00Z"'), "expired",
         r"^deadline 2001-01-01T00:00:00(\.000)?Z has passed"),
        ("deadline passed (offset, fraction)", S_HIGH,
         env(priority=b'"high"', deadline=b'"2020-06-01T12:00:00.5+05:30"'), "expired",
         r"^deadline 2020-06-01T06:30:00\.500Z has passed"),
        ("deadline in year 0001", S, env(deadline=b'"0001-01-01T00:00:00Z"'), "expired",
         r"has passed"),
        ("invalid beats expired", S, env(id_=b'""', deadline=b'"2001-01-01T00:00:00Z"'),
         "invalid", r"^id: empty"),
        # --- bytes around the object
        # jansson quoted the (invisible) mark itself: "invalid token near '\ufeff'".
        ("UTF-8 BOM prefix", S, b"\xef\xbb\xbf" + OK_ENV, "invalid",
         r"^not JSON: starts with a UTF-8 byte order mark$"),
        ("trailing garbage", S, OK_ENV + b" x", "invalid", NOT_JSON),
        ("two objects", S, OK_ENV + OK_ENV, "invalid", NOT_JSON),
        ("trailing comma after the object", S, OK_ENV + b",", "invalid", NOT_JSON),
        # --- size: fits JOBS, but its dead letter (headers + the body) cannot:
        # it was published again every request_timeout, forever, holding its
        # in-flight slot. Now the dead letter leaves the body out and says so.
        ("near max_payload, not JSON", S, b"x" * big_filler, "invalid",
         NOT_JSON + BODY_LEFT_OUT),
    ]
    kinds = [c[0] for c in cases]
    assert len(kinds) == len(set(kinds)), "duplicate kind names"
    return cases


# Headers some bad cases are published with. A pull's status replies carry
# a Status header and no body too; a job must not pass for one.
HEADERS = {
    "empty body with a Status: 408 header": {"Status": "408", "Description": "Request Timeout"},
}


def good_cases():
    """Valid envelopes at the edges of the rules."""
    return [
        ("plain", S, OK_ENV),
        ("high with tenant", S_HIGH, env(priority=b'"high"', tenant=b'"acme"')),
        ("low, dates with offsets and fractions", S_LOW,
         env(priority=b'"low"', created_at=b'"2016-12-31T23:59:60.123456+01:00"',
             deadline=b'"2999-01-01t00:00:00z"')),
        ("nesting exactly 64 deep", S, env(payload=DEEP_OK)),
        ("brackets and quotes inside strings", S,
         env(payload=b'{"s":"[[[[{{{{\\"]]]","t":"\\\\[","u":"' + b"[" * 200 + b'"}')),
        ("\\u0000 and escapes in payload", S,
         env(payload=b'{"nul":"a\\u0000b","pair":"\\ud83d\\ude00","e":"\\u00e9\\n\\/"}')),
        ("id of exactly 200 bytes", S, env(id_=b'"@ID:200@"')),
        ("id with UTF-8 and escapes", S, env(id_=b'"@ID@-\xc3\xa9\\u00e9-\xf0\x9f\x98\x80"')),
        ("type spelt with an escape", S, env(type_=b'"\\u0074"')),
        # Quotes, backslash, SQL and format syntax: the id reaches SQL rows,
        # headers and log lines as data only.
        ("id and tenant with quotes and SQL", S,
         env(id_=b'"@ID@-\'\\";--\\\\ %s $1 %n"', tenant=b'"o\'brien\\\\ \\"x\\""')),
        ("id with U+2028 and U+FFFF, deadline in 9999", S,
         env(id_=b'"@ID@-\\u2028-\\uffff"', deadline=b'"9999-12-31T23:59:59.999+00:00"')),
        ("300 payload keys", S,
         env(payload=b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(300)) + b"}")),
        ("numbers at the edges", S,
         env(payload=b"[9223372036854775807,-9223372036854775808,1e308,-0.0,1.5e-400,"
                     b"0.000000000000000000000000001,1E+2]")),
        ("payload null", S, env(payload=b"null")),
        ("payload a string", S, env(payload=b'"just text"')),
        ("unknown top-level member", S, env(extra=b',"trace":{"id":[1,2,3]}')),
        ("whitespace everywhere", S,
         b' \r\n{ "id" : "@ID@" ,\t"service":"work" ,"type" :"t",\n"payload" : [ ] }\n\r\t '),
        ("key order shuffled, priority normal", S,
         b'{"payload":{"a":{"a":{"a":1}}},"type":"t","priority":"normal","service":"work",'
         b'"id":"@ID@"}'),
        ("payload of 200 KiB", S, env(payload=_s("p" * (200 * 1024)))),
    ]


_PLACEHOLDER_RE = re.compile(rb"@ID(?::(\d+))?@")


def render(body, fresh_id):
    """The body with its placeholders replaced: @ID@ by fresh_id, @ID:N@ by
    fresh_id padded with '=' to N bytes. (body, Nats-Msg-Id or None)."""
    ids = []

    def sub(m):
        v = fresh_id if m.group(1) is None else fresh_id.ljust(int(m.group(1)), "=")
        ids.append(v)
        return v.encode()

    out = _PLACEHOLDER_RE.sub(sub, body)
    return out, (ids[0] if ids else None)


def slug(kind):
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
