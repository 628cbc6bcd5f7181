#!/usr/bin/python3
"""tests/fuzz/make_corpus.py — (re)writes the seed corpus of every fuzz target
into tests/fuzz/corpus/<target>/ from what the project already knows is
interesting: the schema examples, the string literals of the unit tests (after
the C preprocessor, so macros like ENV("...") expand), deploy/jetfleet.ini and
jetfleet.ini.example, real ack subjects of nats-server 2.9.10, and a list of
hand-made edge cases below. File names are <origin>-<sha1 prefix>, so a
re-run rewrites the same files and adds none twice.

    tests/fuzz/make_corpus.py [--clean]

--clean removes every seed file first (never touches regressions/).
Run with /usr/bin/python3; needs gcc for the preprocessor."""
import hashlib
import json
import os
import re
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
CORPUS = os.path.join(HERE, "corpus")


def write(target, origin, data):
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = "%s-%s" % (origin, hashlib.sha1(data).hexdigest()[:12])
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def c_literals(path):
    """Every string literal of a C file after preprocessing, adjacent
    literals joined, C escapes decoded (bytes)."""
    out = subprocess.run(
        ["gcc", "-E", "-P", "-I", os.path.join(ROOT, "common"), '-DJF_SOURCE_DIR="."',
         "-D_POSIX_C_SOURCE=200809L", "-D_DEFAULT_SOURCE", path],
        check=True, capture_output=True, text=True, encoding="latin-1").stdout
    tok = re.compile(r'"((?:[^"\\\n]|\\.)*)"|(\s+)|\'(?:[^\'\\\n]|\\.)*\'|(.)', re.S)
    lits, cur, in_lit = [], b"", False
    for m in tok.finditer(out):
        if m.group(1) is not None:
            cur += decode_c(m.group(1))
            in_lit = True
        elif m.group(2) is not None:
            continue
        elif m.group(3) is None:  # a character literal
            if in_lit:
                lits.append(cur)
            cur, in_lit = b"", False
        else:
            if in_lit:
                lits.append(cur)
            cur, in_lit = b"", False
    # Not inputs: printf formats of failure messages, and expressions that
    # cmocka's assert macros turned into strings.
    noise = re.compile(rb'%[-0-9.]*(?:s|d|zu|lld|llu)|strstr\(|assert_|fail_msg|[a-z_]+\(\\?"')
    return [x for x in lits if not noise.search(x)]


def decode_c(s):
    out, i = bytearray(), 0
    simple = {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, '"': 34, "'": 39, "a": 7, "b": 8,
              "f": 12, "v": 11, "?": 63}
    while i < len(s):
        c = s[i]
        if c != "\\":
            out += c.encode("latin-1")
            i += 1
            continue
        n = s[i + 1]
        if n == "x":
            j = i + 2
            while j < len(s) and s[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(int(s[i + 2:j], 16) & 0xFF)
            i = j
        elif n in "01234567":
            j = i + 1
            while j < len(s) and j < i + 4 and s[j] in "01234567":
                j += 1
            out.append(int(s[i + 1:j], 8) & 0xFF)
            i = j
        else:
            out.append(simple.get(n, ord(n)))
            i += 2
    return bytes(out)


# ---- envelope -------------------------------------------------------------

def envelope_seeds():
    def env(mode, body, origin):
        write("envelope", origin, bytes([mode]) + body)

    ex = os.path.join(ROOT, "schemas", "examples")
    for name in sorted(os.listdir(ex)):
        if not name.startswith("job-"):
            continue
        with open(os.path.join(ex, name), "rb") as f:
            body = f.read()
        compact = json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False)
        for mode in (0x00, 0x01, 0x02):
            env(mode, body, "example")
        env(0x01, compact.encode(), "example")
        if name == "job-full.json":
            for mode in (0x04, 0x08, 0x0C, 0x12, 0x22, 0x32, 0x05, 0x09):
                env(mode, body, "example")
            for subj in (b"jobs.llm.normal", b"jobs.llm.normal.enrich.x", b"jobs..normal.enrich",
                         b"jobs.llm.normal.enrich\n", b"dlq.llm.normal.enrich", b""):
                env(0x03, bytes([len(subj)]) + subj + body, "example")

    for lit in c_literals(os.path.join(ROOT, "tests", "unit", "test_envelope.c")):
        s = lit.lstrip(b" \t\r\n")
        if s[:1] in (b"{", b"[") or b'"id"' in lit:
            env(0x00, lit, "unit")
            env(0x01, lit, "unit")

    base = {"id": "tender-8145", "service": "llm", "type": "enrich", "payload": {}}

    def j(obj):
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")

    edge = [
        b'{"id":"a","service":"s","type":"t","payload":{}}',
        b'  {"id":"a","service":"s","type":"t","payload":null}  \n',
        b'\xef\xbb\xbf{"id":"a","service":"s","type":"t","payload":{}}',
        b'{"id":"a\\u0000b","service":"s","type":"t","payload":{}}',
        b'{"id":"a","service":"s\\u0000","type":"t","payload":{}}',
        b'{"id":"a","service":"s","type":"t","priority":"normal\\u0000x","payload":{}}',
        b'{"id":"\\ud83d\\ude00","service":"s","type":"t","payload":{}}',
        b'{"id":"\\ud83d","service":"s","type":"t","payload":{}}',
        b'{"id":"\xed\xa0\x80","service":"s","type":"t","payload":{}}',
        b'{"id":"\xc0\xaf","service":"s","type":"t","payload":{}}',
        b'{"id":"\xf4\x90\x80\x80","service":"s","type":"t","payload":{}}',
        b'{"id":"\xc2\x85","service":"s","type":"t","payload":{}}',
        b'{"id":"\xc2\xa0","service":"s","type":"t","payload":{}}',
        b'{"id":"a\x7f","service":"s","type":"t","payload":{}}',
        b'{"id":"a\\/b\\\\c\\"d","service":"s","type":"t","payload":{}}',
        b'{"id":"a","id":"b","service":"s","type":"t","payload":{}}',
        b'{"id":"a","service":"s","type":"t","payload":{"k":1,"k":2}}',
        b'{"id":"a","service":"s","type":"t","payload":{"k":{"k":1},"j":{"k":2}}}',
        b'{"i\\u0064":"a","service":"s","type":"t","payload":{}}',
        b'{"id":"a","service":"s","type":"t","payload":[1,-0,0.5,-12.25e3,1E400]}',
        b'{"id":"a","service":"s","type":"t","payload":123456789012345678}',
        b'{"id":"a","service":"s","type":"t","payload":1234567890123456789}',
        b'{"id":"a","service":"s","type":"t","payload":-9223372036854775808}',
        b'{"id":"a","service":"s","type":"t","payload":9223372036854775808}',
        b'{"id":"a","service":"s","type":"t","payload":1234567890.1234567890123}',
        b'{"id":"a","service":"s","type":"t","payload":1234567890.12345678901234}',
        b'{"id":"a","service":"s","type":"t","payload":0.0000000000000000000001}',
        b'{"id":"a","service":"s","type":"t","payload":01}',
        b'{"id":"a","service":"s","type":"t","payload":1.}',
        b'{"id":"a","service":"s","type":"t","payload":-}',
        b'{"id":"a","service":"s","type":"t","payload":[true,false,null]}',
        b'{"id":"a","service":"s","type":"t","payload":truex}',
        b'{"id":"a","service":"s","type":"t","payload":NaN}',
        b'{"id":"a","service":"s","type":"t","payload":{}} x',
        b'{"id":"a","service":"s","type":"t","payload":{}}{}',
        b'{"id":"a","service":"s","type":"t","payload":{}',
        b'{"id":"a","service":"s","type":"t","payload":{},}',
        b'{"id":"a","service":"s","type":"t","payload":{} // c\n}',
        b'{"id":"a",\x00"service":"s","type":"t","payload":{}}',
        b'["id"]', b'"id"', b'null', b'', b' ', b'{}', b'{"payload":{}}',
        b'{"id":1,"service":"s","type":"t","payload":{}}',
        b'{"id":"a","service":["s"],"type":"t","payload":{}}',
        b'{"id":"a","service":"s","type":"t","tenant":null,"payload":{}}',
        b'{"id":"a","service":"s","type":"t","tenant":"","payload":{}}',
        b'{"id":"a","service":"s","type":"t.x","payload":{}}',
        b'{"id":"a","service":"s","type":"t","priority":"HIGH","payload":{}}',
        b'{"id":"a","service":"s","type":"t","priority":"low","payload":{}}',
    ]
    for e in edge:
        env(0x00, e, "edge")
        env(0x01, e, "edge")
    for t in ("2026-11-22T10:00:00Z", "2026-11-22T10:00:00.123456789+05:30", "2026-11-22t10:00:00z",
              "2016-12-31T23:59:60Z", "2026-02-29T00:00:00Z", "2024-02-29T00:00:00-00:00",
              "2026-11-22 10:00:00Z", "2026-11-22T10:00:00", "9999-12-31T23:59:59+23:59",
              "0000-01-01T00:00:00Z", "2026-11-22T24:00:00Z", "2026-11-22T10:00:00.Z"):
        for key in ("created_at", "deadline"):
            env(0x00, j(dict(base, **{key: t})), "edge")
    for n in (200, 201):
        env(0x01, j(dict(base, id="x" * n)), "edge")
        env(0x00, j(dict(base, tenant="\u00e9" * (n // 2) + "x" * (n % 2))), "edge")
    env(0x01, j(dict(base, service="s" * 128, type="t" * 128)), "edge")
    env(0x01, j(dict(base, service="s" * 129)), "edge")
    for depth in (63, 64, 65):
        env(0x00, j(dict(base, payload=json.loads("[" * (depth - 1) + "]" * (depth - 1)))), "edge")
        nested = b'{"a":' * (depth - 1) + b"1" + b"}" * (depth - 1)
        env(0x00, j(dict(base, payload=None))[:-5] + nested + b"}", "edge")
    many = dict(base)
    many["payload"] = {"k%d" % i: i for i in range(130)}
    env(0x00, j(many), "edge")
    many = {"k%d" % i: i for i in range(130)}
    many.update(base)
    env(0x00, j(many), "edge")
    env(0x04, j(base), "edge")
    env(0x08, j(base), "edge")
    env(0x01, j(dict(base, payload={"text": "\u00e9\u4e2d\U0001F600" * 20, "esc": "\"\\/\b\f\n\r\t"})), "edge")


# ---- config ---------------------------------------------------------------

def config_seeds():
    for rel in ("deploy/jetfleet.ini", "jetfleet.ini.example"):
        p = os.path.join(ROOT, rel)
        if os.path.exists(p):
            with open(p, "rb") as f:
                write("config", "file", f.read())
    for lit in c_literals(os.path.join(ROOT, "tests", "unit", "test_config.c")):
        if b"[" in lit or b"=" in lit:
            write("config", "unit", lit)
    write("config", "edge", b"[nats]\n;!env NATS_URL=nats://a:1,nats://b:2\n"
          b";!env SERVICE_LLM_MAX_DELIVER=7\n[service.llm]\nkind = noop\n")
    write("config", "edge", b";!env NATS_PASSWORD=hunter2hunter2\n[nats]\nuser = u\n")
    write("config", "edge", b"[nats]\npassword = s3cr3tpassw0rd\n")
    write("config", "edge", b"[postgres]\nbreaker_window = 50\nbreaker_min_calls = 40\n")
    write("config", "edge", b"[service.a]\nkind = http\nurl = notaurl12345\n")
    write("config", "edge", b"[service.a-b]\nkind=noop\n[service.a_b]\nkind=noop\n")
    write("config", "edge", b"".join(b"[service.s%d]\nkind = noop\n" % i for i in range(65)))
    write("config", "edge", b"[consumer]\npriority_weights = 6, 3 ,1\n"
          b"[service.x]\nkind = noop\nbackoff = 1s, 2s,3s ,1m30s\nrate = 30/m\n")
    write("config", "edge", b"\xef\xbb\xbf[log]\nlevel = debug\n\n  ; indented comment\n")
    write("config", "edge", b"[nats]\nurl = x\n  continued\n")
    write("config", "edge", b"[ stream ] ; c\nname = A\ndlq = A\n")
    write("config", "edge", b"[stream\nname = A\n")
    write("config", "edge", b"[nats]\r\nurl = nats://x:1\r\n")
    write("config", "edge", b"[x" + b"y" * 200 + b"]\n")
    write("config", "edge", b"[nats]\nurl = " + b"u" * 5000 + b"\n")


# ---- duration -------------------------------------------------------------

def duration_seeds():
    for lit in c_literals(os.path.join(ROOT, "tests", "unit", "test_duration.c")):
        if 0 < len(lit) < 200:
            write("duration", "unit", lit)
    for s in ("0", "0s", "1m30s", "1d2h3m4s5ms", "106751991167d", "9223372036854775807ms",
              "9223372036854775808ms", "1s,5s,30s", " 1s , 2s ", "1s,,2s", "1.5s", "-1s",
              "30/m", "1000000000/s", "1000000001/s", "none", "0/s", "5/d", "1ms1s", "1 s", "1S"):
        write("duration", "edge", s)
    # jf_duration_format: 8 bytes of int64, then the capacity.
    for v, cap in ((0, 10), (90000, 4), (-1, 50), (-2 ** 63, 71), (2 ** 63 - 1, 0), (86400001, 7)):
        write("duration", "format", struct.pack(">qB", v, cap))


# ---- retry_after ------------------------------------------------------------

NOW_MS = 1445412480000  # Wed, 21 Oct 2015 07:28:00 GMT, as in test_retry_after.c


def retry_seed(max_idx, value, now=NOW_MS, origin="edge"):
    if isinstance(value, str):
        value = value.encode("latin-1")
    write("retry_after", origin, bytes([max_idx]) + now.to_bytes(6, "big") + value)


def retry_after_seeds():
    for lit in c_literals(os.path.join(ROOT, "tests", "unit", "test_retry_after.c")):
        if 0 < len(lit) <= 140:
            retry_seed(0, lit, origin="unit")
    for v in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
              "Sun Nov  6 08:49:37 1994", "Wed, 21 Oct 2015 07:28:00 GMT",
              "Thursday, 22-Oct-15 07:28:00 GMT", "Thu Oct 22 07:28:00 2015",
              "Sat, 31 Dec 2016 23:59:60 GMT", "Mon, 29 Feb 2016 00:00:00 GMT",
              "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT",
              "120", " 5 ", "-1", "1.5", "", "\t", "99999999999999999999999999", "0x10",
              "sun, 06 Nov 1994 08:49:37 gmt", "Sun, 6 Nov 1994 08:49:37 GMT", "9" * 129):
        for idx in (0, 1, 3, 4):
            retry_seed(idx, v)
    retry_seed(0, "Thursday, 01-Jan-70 00:00:00 GMT", now=0)
    retry_seed(0, "Friday, 31-Dec-99 23:59:59 GMT", now=253402300799000)


# ---- jsmsg ----------------------------------------------------------------

def jsmsg_seeds():
    # As nats-server 2.9.10 sent them to a pull of the durable llm-normal
    # (the fourth is a redelivery after -NAK).
    for s in ("$JS.ACK.JOBS.llm-normal.1.1.1.1795825590293414901.2",
              "$JS.ACK.JOBS.llm-normal.1.2.2.1795825590294170164.1",
              "$JS.ACK.JOBS.llm-normal.1.3.3.1795825590294667835.0",
              "$JS.ACK.JOBS.llm-normal.2.1.4.1795825590293414901.0"):
        write("jsmsg", "server", s)
    for lit in c_literals(os.path.join(ROOT, "tests", "unit", "test_jsmsg.c")):
        if lit.startswith(b"$JS") or lit.startswith(b"JS."):
            write("jsmsg", "unit", lit)
    for s in ("$JS.ACK._.ACCHASH.JOBS.echo-high.3.1000.12.1764322800000000000.0",
              "$JS.ACK.hub.ACCHASH.JOBS_DLQ.ops-low.1.2.3.4.5.r4nd0m",
              "$JS.ACK.hub.ACCHASH.JOBS.c.1.2.3.4.5.r.extra",
              "$JS.ACK.S.C.1.9223372036854775807.3.4.5",
              "$JS.ACK.S.C.1.9223372036854775808.3.4.5",
              "$JS.ACK.S.C.1.2.3.4", "$JS.ACK.S.C.1.2.3.4.5.6", "$JS.ACK..C.1.2.3.4.5",
              "100\nIdle Heartbeat", "408\nRequest Timeout", "404\nNo Messages",
              "409\nExceeded MaxWaiting", "409\nConsumer Deleted", "409\nconsumer deleted",
              "409", "503\nNo Responders", "100"):
        write("jsmsg", "edge", s)


def main():
    if "--clean" in sys.argv[1:]:
        for t in os.listdir(CORPUS) if os.path.isdir(CORPUS) else ():
            d = os.path.join(CORPUS, t)
            for name in os.listdir(d):
                os.remove(os.path.join(d, name))
    envelope_seeds()
    config_seeds()
    duration_seeds()
    retry_after_seeds()
    jsmsg_seeds()
    for t in sorted(os.listdir(CORPUS)):
        print("%-12s %4d seeds" % (t, len(os.listdir(os.path.join(CORPUS, t)))))


if __name__ == "__main__":
    main()
