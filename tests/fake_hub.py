"""An in-process stand-in for the Hugging Face Hub, for push/download tests without network.

huggingface_hub (>= 1.0) sends every request through one shared `httpx2.Client` built by a replaceable factory
(`huggingface_hub.set_client_factory`). `FakeHub.install()` swaps in a client whose transport answers from a dict of
repositories kept in memory, so `create_repo`, `upload_folder`, diffusers' `push_to_hub`, `Dataset.push_to_hub` and
`snapshot_download` all run end to end. It is not a Hub: no auth, branches, PRs or history; every revision is
"main" and every repository reports the same commit sha.

Usage (see the `fake_hub` fixture in tests/test_hub_push.py):

    hub = FakeHub()
    hub.install()          # and hub.uninstall() afterwards
    ...push...
    hub.repos["user/name"]["model_index.json"]   # bytes of the pushed file
    hub.commits                                  # [(repo_id, commit message, [paths]), ...]
    hub.private["user/name"]                     # whether the repository was created private
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading

import httpx2

_SHA = "0" * 40


class FakeHub:
    """In-memory Hub. `upload_mode` is what preupload answers: "regular" (file bytes inline in the commit) or "lfs"
    (bytes sent to a separate PUT, which `datasets` needs because it deletes its temporary files after preupload).

    `fail_requests(n, path_pattern)` makes the next `n` requests whose path matches the regex answer HTTP 400, to
    simulate an outage (400 rather than 5xx, which huggingface_hub would retry itself with second-long sleeps).
    """

    def __init__(self, endpoint: str | None = None, upload_mode: str = "regular"):
        from huggingface_hub import constants

        # URLs handed back must be on the configured endpoint's host, or huggingface_hub refuses to parse them.
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.upload_mode = upload_mode
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[tuple[str, str, list[str]]] = []
        self.private: dict[str, bool] = {}
        self.requests: list[str] = []
        self.seen_headers: list[dict[str, str]] = []
        self._lfs: dict[str, bytes] = {}
        self._failures: list[list] = []  # [remaining, compiled pattern, echo headers]
        self._lock = threading.Lock()
        self._previous_factory = None

    # -- control -----------------------------------------------------------------------------------------------
    def fail_requests(self, count: int, path_pattern: str = r"/commit/", echo_headers: bool = False) -> None:
        """The next `count` requests matching `path_pattern` fail; with `echo_headers` the error text repeats the
        request's headers, Authorization included, as some proxies and servers do."""
        with self._lock:
            self._failures.append([count, re.compile(path_pattern), echo_headers])

    def install(self) -> FakeHub:
        from huggingface_hub.utils import _http

        self._previous_factory = _http._GLOBAL_CLIENT_FACTORY
        _http.set_client_factory(self.client)
        return self

    def uninstall(self) -> None:
        from huggingface_hub.utils import _http

        if self._previous_factory is not None:
            _http.set_client_factory(self._previous_factory)
            self._previous_factory = None

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handle), follow_redirects=True)

    # -- request handling --------------------------------------------------------------------------------------
    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path, method = request.url.path, request.method
        with self._lock:
            self.requests.append(f"{method} {path}")
            self.seen_headers.append(dict(request.headers))
            for failure in self._failures:
                if failure[0] > 0 and failure[1].search(path):
                    failure[0] -= 1
                    error = "fake hub: simulated outage"
                    if failure[2]:
                        error += f" (request headers: {dict(request.headers)})"
                    return httpx2.Response(400, json={"error": error})
            return self._route(request, path, method)

    def _route(self, request, path, method):
        respond = httpx2.Response
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
            if body.get("type") == "dataset":
                repo_id = "datasets/" + repo_id
            url = f"{self.endpoint}/{repo_id}"
            if repo_id.removeprefix("datasets/") in self.repos:
                return respond(409, json={"error": "You already created this repo", "url": url})
            self.repos[repo_id.removeprefix("datasets/")] = {}
            # huggingface_hub >= 2 sends "visibility"; earlier releases sent "private".
            private = body.get("visibility") == "private" or bool(body.get("private"))
            self.private[repo_id.removeprefix("datasets/")] = private
            return respond(200, json={"url": url})

        if method == "POST" and path == "/api/validate-yaml":
            return respond(200, json={"errors": [], "warnings": []})

        if method == "POST" and re.match(r"^/api/(models|datasets)/.+?/preupload/[^/]+$", path):
            files = json.loads(request.content)["files"]
            return respond(
                200,
                json={
                    "files": [{"path": f["path"], "uploadMode": self.upload_mode, "shouldIgnore": False} for f in files]
                },
            )

        if method == "POST" and re.match(r"^/(?:datasets/)?.+\.git/info/lfs/objects/batch$", path):
            objects = json.loads(request.content)["objects"]
            return respond(
                200,
                json={
                    "objects": [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "actions": {"upload": {"href": f"{self.endpoint}/fake-lfs/{o['oid']}"}},
                        }
                        for o in objects
                    ]
                },
            )

        if method == "PUT" and (match := re.match(r"^/fake-lfs/([0-9a-f]+)$", path)):
            self._lfs[match[1]] = request.read()
            return respond(200)

        if method == "POST" and (match := re.match(r"^/api/(models|datasets)/(.+?)/commit/[^/]+$", path)):
            return self._commit(match[2], request.content)

        if method == "GET" and (
            match := re.match(r"^/api/(?:models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
        ):
            files = self.repos.get(match[1], {})
            prefix = (match[3] or "").strip("/")
            listed = {p: b for p, b in files.items() if not prefix or p.startswith(prefix + "/")}
            if prefix and not listed:
                return respond(404, headers={"X-Error-Code": "EntryNotFound"}, json={})
            return respond(
                200,
                json=[
                    {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for p, b in sorted(listed.items())
                ],
            )

        if method == "GET" and (
            match := re.match(r"^/api/(?:models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
        ):
            if match[1] not in self.repos:
                return respond(404, headers={"X-Error-Code": "RepoNotFound"}, json={})
            siblings = [{"rfilename": p} for p in sorted(self.repos[match[1]])]
            return respond(200, json={"id": match[1], "sha": _SHA, "private": False, "siblings": siblings})

        if match := re.match(r"^/(?:datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
            if match[1] not in self.repos:
                return respond(404, headers={"X-Error-Code": "RepoNotFound"})
            if match[3] not in self.repos[match[1]]:
                return respond(404, headers={"X-Error-Code": "EntryNotFound"})
            data = self.repos[match[1]][match[3]]
            headers = {
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "X-Repo-Commit": _SHA,
                "Content-Length": str(len(data)),
            }
            return respond(200, content=b"" if method == "HEAD" else data, headers=headers)

        return respond(404, json={"error": f"fake hub: unhandled {method} {path}"})

    def _commit(self, repo_id: str, body: bytes) -> httpx2.Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = self.repos.setdefault(repo_id, {})
        paths, summary = [], ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            elif key == "lfsFile":
                files[value["path"]] = self._lfs[value["oid"]]
                paths.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
        oid = hashlib.sha1((summary + json.dumps(sorted(paths)) + str(len(self.commits))).encode()).hexdigest()
        self.commits.append((repo_id, summary, paths))
        return httpx2.Response(200, json={"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})
