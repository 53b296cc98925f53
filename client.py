"""The command line's way to the running daemon: its HTTP API (SPEC §6), with the
bearer token from the config when one is set."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import HydrodError
from .settings import HttpSettings


class ApiClient:
    def __init__(self, http: HttpSettings, what: str):
        """`what` names the command, for the error when the API is switched off."""
        if not http.enabled:
            raise HydrodError(f"{what} goes through the daemon's HTTP API, and http.enabled is false")
        self.host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
        self.port = http.port
        self.token = http.token.get_secret_value()

    def request(self, method: str, path: str, params: dict[str, str] | None = None, body: bytes | None = None,
                refused: str = "refused") -> bytes:
        """The answer's body; HydrodError naming the status and the API's message when
        it is not 2xx (`refused` says what was refused), or when hydrod cannot be reached."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        request = urllib.request.Request(f"http://{self.host}:{self.port}{path}{query}", data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise HydrodError(f"{refused} ({exc.code}): {_message(exc.read())}") from None
        except OSError as exc:
            raise HydrodError(f"cannot reach hydrod at {self.host}:{self.port}: {exc}") from None

    def get_json(self, path: str, params: dict[str, str] | None = None, refused: str = "refused") -> Any:
        return json.loads(self.request("GET", path, params, refused=refused))


def _message(raw: bytes) -> str:
    """The API's `error`, or the body as it came."""
    text = raw.decode(errors="replace")
    try:
        return json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text


def node_path(uid: str, *rest: str) -> str:
    return "/".join(("/api/nodes", urllib.parse.quote(uid, safe=""), *rest))
