"""A local OIDC issuer for tests: discovery and JWKS over HTTP on 127.0.0.1, keys generated here, tokens
signed with joserfc, plus the hand-made forgeries of the identity attack matrix."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import threading
import time
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)

_ALG_FOR = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}
_kids = itertools.count(1)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_key(kind: str = "RSA", kid: str | None = None) -> Key:
    kid = kid or f"{kind.lower()}-{next(_kids)}-{uuid.uuid4().hex[:6]}"
    if kind == "RSA":
        return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})
    if kind == "EC":
        return ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig"})
    return OKPKey.generate_key("Ed25519", parameters={"kid": kid, "use": "sig"})


class LocalIssuer:
    """An OIDC issuer at http://127.0.0.1:<port>; `published` keys are what its JWKS serves."""

    def __init__(self) -> None:
        self.published: list[Key] = []
        self.issued: list[str] = []  # every token signed here, for the leak scans
        self.jwks_requests = 0
        self.discovery_requests = 0
        self.available = True
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self):
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not issuer.available:
                    self.send_error(503)
                    return
                if self.path == "/.well-known/openid-configuration":
                    issuer.discovery_requests += 1
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_requests += 1
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def start(self) -> "LocalIssuer":
        threading.Thread(target=self._server.serve_forever, name="oidc-issuer", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def jwks(self) -> dict:
        return {"keys": [k.as_dict(private=False) for k in self.published]}

    def add_key(self, kind: str = "RSA") -> Key:
        key = make_key(kind)
        self.published.append(key)
        return key

    @property
    def key(self) -> Key:
        return self.published[0]

    def claims(self, audience: str = "auditgate", subject: str = "user-1", groups: list[str] | None = None,
               lifetime: int = 600, **extra) -> dict:
        now = int(time.time())
        claims = {"iss": self.url, "aud": audience, "sub": subject, "iat": now, "nbf": now, "exp": now + lifetime,
                  "jti": uuid.uuid4().hex}
        if groups is not None:
            claims["groups"] = groups
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict, key: Key | None = None, header: dict | None = None) -> str:
        key = key or self.key
        alg = _ALG_FOR[key.key_type]
        token = jwt.encode({"alg": alg, "kid": key.kid, **(header or {})}, claims, key, algorithms=[alg])
        self.issued.append(token)
        return token

    def token(self, key: Key | None = None, **claims) -> str:
        return self.sign(self.claims(**claims), key)

    # ---- forgeries ------------------------------------------------------------------------------
    def forge_alg_none(self, **claims) -> str:
        header = {"alg": "none", "typ": "JWT", "kid": self.key.kid}
        token = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(self.claims(**claims)).encode())}."
        self.issued.append(token)
        return token

    def forge_hs256_with_public_key(self, **claims) -> str:
        """The key confusion attack: HMAC keyed with the issuer's public key, which anyone can download."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.key.kid}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(self.claims(**claims)).encode())}"
        signature = hmac.new(self.key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64url(signature)}"
        self.issued.append(token)
        return token

    def tamper(self, token: str, **changes) -> str:
        """The same signature over a payload with changed claims."""
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims.update(changes)
        forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
        self.issued.append(forged)
        return forged
