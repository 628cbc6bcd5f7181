"""natsauth — credentials for the NATS authentication tests, made locally.

nkeys (Ed25519 keys in NATS' text form), operator/account/user JWTs and
.creds files, with python3-cryptography (Debian's python3 has it); TLS
certificates (a CA, a server certificate for 127.0.0.1, client certificates)
with the openssl command-line tool. Nothing here talks to a network.

Formats, as nats-server 2.9 reads them:
- nkey: base32 (RFC 4648, no padding) of prefix byte(s) + 32 key bytes +
  CRC-16/XMODEM of both, little-endian. A public key has one prefix byte
  (the key type: O operator, A account, U user, N server); a seed has two,
  'S' (18 << 3) with the key type spread over its low 3 bits and the next
  byte's high 5 bits.
- JWT: base64url (no padding) of {"typ":"JWT","alg":"ed25519-nkey"}, "." the
  claims, "." the issuer's Ed25519 signature of the first two parts. Claims
  carry jti (base32 of SHA-512/256 of the claims with jti empty), iat, iss,
  sub, name and "nats": {type, version 2, …}. An account has JetStream when
  its limits give mem_storage or disk_storage other than 0.
- .creds: the user JWT and seed between "-----BEGIN NATS USER JWT-----" /
  "------END NATS USER JWT------" and "-----BEGIN USER NKEY SEED-----" /
  "------END USER NKEY SEED------" lines.
"""

import base64
import hashlib
import json
import os
import subprocess
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PREFIX_SEED = 18 << 3
PREFIX_OPERATOR = 14 << 3
PREFIX_ACCOUNT = 0
PREFIX_USER = 20 << 3


def crc16_xmodem(data):
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _b32(data):
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _b64url(data):
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _with_crc(raw):
    return raw + crc16_xmodem(raw).to_bytes(2, "little")


class NKey:
    """One Ed25519 key pair of a given type (PREFIX_USER, …)."""

    def __init__(self, prefix, private=None):
        self.prefix = prefix
        self._key = private or Ed25519PrivateKey.generate()
        self._raw_seed = self._key.private_bytes(serialization.Encoding.Raw,
                                                 serialization.PrivateFormat.Raw,
                                                 serialization.NoEncryption())
        self._raw_pub = self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw)

    @property
    def public(self):
        return _b32(_with_crc(bytes([self.prefix]) + self._raw_pub))

    @property
    def seed(self):
        b1 = PREFIX_SEED | (self.prefix >> 5)
        b2 = (self.prefix & 31) << 3
        return _b32(_with_crc(bytes([b1, b2]) + self._raw_seed))

    def sign(self, data):
        return self._key.sign(data)


def decode_public(text):
    """(prefix byte, 32 key bytes) of a public nkey; raises ValueError."""
    raw = base64.b32decode(text + "=" * (-len(text) % 8))
    if len(raw) != 35 or crc16_xmodem(raw[:33]) != int.from_bytes(raw[33:], "little"):
        raise ValueError("not a public nkey: %r" % text)
    return raw[0], raw[1:33]


def encode_jwt(claims, issuer):
    """A JWT of claims (dict, without iss/iat/jti), signed by issuer (NKey)."""
    body = dict(claims)
    body["iss"] = issuer.public
    body["iat"] = int(time.time())
    body["jti"] = ""
    digest = hashlib.new("sha512_256", json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = _b32(digest)
    head = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64url(json.dumps(body, separators=(",", ":")).encode())
    signing_input = ("%s.%s" % (head, payload)).encode("ascii")
    return "%s.%s.%s" % (head, payload, _b64url(issuer.sign(signing_input)))


def jwt_claims(token):
    """The claims of a JWT (not verified)."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


UNLIMITED_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


class Operator:
    """An operator with accounts and users, for a server in operator mode
    (`operator`, `resolver: MEMORY`, `resolver_preload`)."""

    def __init__(self, name="jetfleet-test"):
        self.name = name
        self.key = NKey(PREFIX_OPERATOR)
        self.accounts = {}  # name -> (NKey, jwt)
        self.jwt = encode_jwt({"sub": self.key.public, "name": name,
                               "nats": {"type": "operator", "version": 2}}, self.key)

    def add_account(self, name, jetstream=True, signer=None):
        """An account signed by this operator (or by signer, e.g. an
        operator the server does not trust); returns its NKey."""
        key = NKey(PREFIX_ACCOUNT)
        limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                  "wildcards": True, "conn": -1, "leaf": -1}
        if jetstream:
            limits.update(UNLIMITED_JETSTREAM)
        token = encode_jwt({"sub": key.public, "name": name,
                            "nats": {"limits": limits, "default_permissions": {"pub": {}, "sub": {}},
                                     "type": "account", "version": 2}}, signer or self.key)
        self.accounts[name] = (key, token)
        return key

    def user_creds(self, account, name, expires=None, pub_allow=None, signer=None):
        """The text of a .creds file for a new user of account (name);
        expires: unix time of the JWT's exp. signer: an NKey to sign with
        instead of the account's key (a forged user)."""
        acc_key, _ = self.accounts[account]
        user = NKey(PREFIX_USER)
        claims = {"sub": user.public, "name": name,
                  "nats": {"pub": {"allow": pub_allow} if pub_allow else {}, "sub": {},
                           "subs": -1, "data": -1, "payload": -1,
                           "type": "user", "version": 2}}
        if expires is not None:
            claims["exp"] = int(expires)
        token = encode_jwt(claims, signer or acc_key)
        return creds_text(token, user.seed)

    def server_config(self, system_account=None):
        """The operator-mode lines of a nats-server config."""
        preload = ",\n".join('    %s: "%s"' % (k.public, tok) for k, tok in self.accounts.values())
        lines = ['operator: "%s"' % self.jwt, "resolver: MEMORY",
                 "resolver_preload: {\n%s\n}" % preload]
        if system_account:
            lines.append("system_account: %s" % self.accounts[system_account][0].public)
        return "\n".join(lines)


def creds_text(user_jwt, seed):
    return ("-----BEGIN NATS USER JWT-----\n%s\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            "-----BEGIN USER NKEY SEED-----\n%s\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n" % (user_jwt, seed))


def write_secret(path, text):
    """Writes a file readable by its owner only (as nsc and the programs expect)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------
# TLS with the openssl CLI

def _openssl(args, cwd):
    cp = subprocess.run(["openssl"] + args, cwd=cwd, stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if cp.returncode != 0:
        raise RuntimeError("openssl %s: %s" % (" ".join(args), cp.stderr.decode(errors="replace")))


class CertAuthority:
    """A throw-away CA in directory d; issue() makes certificates it signs.
    EC P-256 keys: fast to make, understood by Go's and OpenSSL's TLS."""

    def __init__(self, d, name="jetfleet-test-ca"):
        self.dir = d
        os.makedirs(d, exist_ok=True)
        self.name = name
        self.cert = os.path.join(d, "%s.pem" % name)
        self.key = os.path.join(d, "%s-key.pem" % name)
        _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "2",
                  "-subj", "/CN=%s" % name,
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)

    def issue(self, name, server=False, client=False):
        """(cert path, key path) of a certificate for CN=name: server (SAN
        IP 127.0.0.1 and localhost, serverAuth) and/or client (clientAuth)."""
        key = os.path.join(self.dir, "%s-key.pem" % name)
        csr = os.path.join(self.dir, "%s.csr" % name)
        cert = os.path.join(self.dir, "%s.pem" % name)
        ext = os.path.join(self.dir, "%s.ext" % name)
        usage = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=%s\n" % ",".join(usage))
            if server:
                f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=%s" % name], self.dir)
        _openssl(["x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                  "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext], self.dir)
        os.chmod(key, 0o600)
        return cert, key
