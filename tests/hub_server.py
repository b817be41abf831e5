"""A Hub-compatible HTTP server for the tests: the endpoints `huggingface_hub` and `datasets` use to create a
dataset repo, upload through LFS, commit, list, resolve and download. Repos live on disk; it listens on 127.0.0.1.

It speaks only what the tests need, the way the real Hub answers it (status codes, `X-Error-Code`, ETag and
`X-Repo-Commit` headers), plus failure injection: `fail_next(n)` answers 500 to the next n requests,
`fail_always()` to every request until `recover()`.
"""

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


TEXT_LIMIT = 10 * 1024 * 1024


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubState:
    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = root
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, dict] = {}  # "dataset:user/name" -> repo
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.failures_left = 0
        self.always_fail = False
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    # blobs are content-addressed by sha256
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def store(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        self.blob_path(sha256).write_bytes(content)
        return sha256

    def files_at(self, repo: dict, revision: str) -> tuple[str, dict] | None:
        commit_id = repo["branches"].get(revision, revision if revision in repo["commits"] else None)
        if commit_id is None:
            return None
        return commit_id, repo["commits"][commit_id]["files"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set by serve()

    def log_message(self, *args):
        pass

    # ------------------------------------------------------------------ plumbing
    def reply(self, status: int, body=b"", headers: dict | None = None, content_type="application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status: int, code: str, message: str):
        self.reply(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return self.state.tokens.get(auth[len("Bearer ") :]) if auth.startswith("Bearer ") else None

    def base_url(self) -> str:
        return f"http://{self.headers['Host']}"

    def handle_any(self):
        state = self.state
        url = urlparse(self.path)
        path = unquote(url.path)
        with state.lock:
            state.requests.append(f"{self.command} {path}")
            failing = state.always_fail or state.failures_left > 0
            if state.failures_left > 0:
                state.failures_left -= 1
        if failing:
            self.body()
            return self.error(500, "InternalError", "injected failure")
        query = parse_qs(url.query)
        try:
            return self.route(path, query)
        except Exception as exc:  # a bug in the test server shows up as a 500 with its message
            return self.error(500, "ServerBug", f"{type(exc).__name__}: {exc}")

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = handle_any

    # ------------------------------------------------------------------ routes
    def route(self, path: str, query: dict):
        parts = path.strip("/").split("/")
        if path == "/api/whoami-v2":
            user = self.user()
            if user is None:
                return self.error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return self.reply(
                200,
                {
                    "type": "user",
                    "name": user,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                },
            )
        if path == "/api/validate-yaml":
            self.body()
            return self.reply(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and self.command == "POST":
            return self.create_repo(json.loads(self.body()))
        if path == "/api/repos/delete" and self.command == "DELETE":
            return self.delete_repo(json.loads(self.body()))
        if path.startswith("/lfs-upload/") and self.command == "PUT":
            content = self.body()
            oid = parts[-1]
            if hashlib.sha256(content).hexdigest() != oid:
                return self.error(400, "BadRequest", "sha256 mismatch")
            self.state.store(content)
            return self.reply(200, {})
        if len(parts) >= 3 and parts[0] == "datasets" and parts[2].endswith(".git"):
            return self.lfs_batch(f"{parts[1]}/{parts[2][:-4]}")
        if len(parts) >= 5 and parts[0] == "datasets" and parts[3] == "resolve":
            return self.resolve(f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]))
        if len(parts) >= 4 and parts[:2] == ["api", "datasets"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            return self.repo_api(repo_id, rest, query)
        return self.error(404, "NotFound", f"no route for {self.command} {path}")

    def repo(self, repo_id: str, write: bool = False) -> dict | None:
        repo = self.state.repos.get(repo_id)
        user = self.user()
        if repo is None or (repo["private"] and user != repo["owner"]):
            self.error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None
        if write and user != repo["owner"]:
            self.error(403, "Forbidden", f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def create_repo(self, payload: dict):
        user = self.user()
        if user is None:
            return self.error(401, "Unauthorized", "Invalid credentials in Authorization header")
        owner = payload.get("organization") or user
        if owner != user:
            return self.error(403, "Forbidden", f"You don't have the rights to create a repo under {owner}")
        repo_id = f"{owner}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self.error(409, "RepoExists", "You already created this dataset repo")
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            self.state.repos[repo_id] = {
                "owner": owner,
                "private": private,
                "branches": {"main": "0" * 40},
                "commits": {"0" * 40: {"files": {}, "parent": None, "message": "init"}},
            }
        return self.reply(200, {"url": f"{self.base_url()}/datasets/{repo_id}", "name": repo_id})

    def delete_repo(self, payload: dict):
        repo_id = f"{payload.get('organization') or self.user()}/{payload['name']}"
        if self.repo(repo_id, write=True) is None:
            return
        with self.state.lock:
            del self.state.repos[repo_id]
        return self.reply(200, {})

    def repo_info(self, repo_id: str, repo: dict, revision: str):
        found = self.state.files_at(repo, revision)
        if found is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        commit_id, files = found
        return self.reply(
            200,
            {
                "_id": repo_id,
                "id": repo_id,
                "author": repo["owner"],
                "sha": commit_id,
                "private": repo["private"],
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2024-07-26T12:00:00.000Z",
                "createdAt": "2024-07-26T12:00:00.000Z",
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )

    def tree_entry(self, path: str, meta: dict) -> dict:
        entry = {"type": "file", "oid": meta["oid"], "size": meta["size"], "path": path}
        if meta["lfs"]:
            entry["lfs"] = {"oid": meta["sha256"], "size": meta["size"], "pointerSize": 134}
        return entry

    def listing(self, files: dict, prefix: str, recursive: bool) -> list[dict] | None:
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for path, meta in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            if "/" in rest and not recursive:
                folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            if recursive:
                pieces = rest.split("/")[:-1]
                for i in range(1, len(pieces) + 1):
                    folders.add((prefix + "/" if prefix else "") + "/".join(pieces[:i]))
            entries.append(self.tree_entry(path, meta))
        if prefix and not entries and not folders:
            return None
        return [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ] + entries

    def repo_api(self, repo_id: str, rest: list[str], query: dict):
        if self.command == "POST" and rest and rest[0] == "branch":
            repo = self.repo(repo_id, write=True)
            if repo is None:
                return
            branch = "/".join(rest[1:])
            self.body()
            if branch in repo["branches"]:
                return self.error(409, "BranchExists", "Reference already exists")
            repo["branches"][branch] = repo["branches"]["main"]
            return self.reply(200, {})
        repo = self.repo(repo_id)
        if repo is None:
            return
        if not rest:
            return self.repo_info(repo_id, repo, "main")
        kind, revision = rest[0], unquote(rest[1]) if len(rest) > 1 else "main"
        if kind == "revision":
            return self.repo_info(repo_id, repo, revision)
        if kind == "refs":
            return self.reply(
                200,
                {
                    "branches": [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo["branches"].items()
                    ],
                    "tags": [],
                    "converts": [],
                },
            )
        found = self.state.files_at(repo, revision)
        if found is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        commit_id, files = found
        if kind == "tree":
            listing = self.listing(files, "/".join(rest[2:]), query.get("recursive", ["false"])[0] == "true")
            if listing is None:
                return self.error(404, "EntryNotFound", "path not found")
            return self.reply(200, listing)
        if kind == "paths-info":
            raw = self.body()
            content_type = self.headers.get("Content-Type", "")
            if "json" in content_type:
                paths = json.loads(raw)["paths"]
            else:
                paths = parse_qs(raw.decode()).get("paths", [])
            out = []
            for p in paths:
                if p in files:
                    out.append(self.tree_entry(p, files[p]))
                elif any(f.startswith(p.rstrip("/") + "/") for f in files):
                    out.append(
                        {"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                    )
            return self.reply(200, out)
        if kind == "preupload":
            payload = json.loads(self.body())
            out = []
            for item in payload["files"]:
                sample = base64.b64decode(item.get("sample", ""))
                binary = b"\0" in sample or item["path"].endswith((".parquet", ".png", ".arrow"))
                out.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if binary or item["size"] > TEXT_LIMIT else "regular",
                        "shouldIgnore": False,
                        "oid": files[item["path"]]["oid"] if item["path"] in files else None,
                    }
                )
            return self.reply(200, {"files": out, "commitOid": commit_id})
        if kind == "commit":
            return self.commit(repo_id, repo, revision)
        return self.error(404, "NotFound", f"no route for {rest}")

    def lfs_batch(self, repo_id: str):
        payload = json.loads(self.body())
        repo = self.repo(repo_id, write=payload.get("operation") == "upload")
        if repo is None:
            return
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if not self.state.blob_path(obj["oid"]).exists():
                entry["actions"] = {"upload": {"href": f"{self.base_url()}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return self.reply(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def commit(self, repo_id: str, repo: dict, revision: str):
        if self.user() != repo["owner"]:
            self.body()
            return self.error(403 if self.user() else 401, "Forbidden", f"You don't have the rights to {repo_id}")
        lines = [json.loads(line) for line in self.body().decode().splitlines() if line.strip()]
        with self.state.lock:
            parent = repo["branches"].get(revision)
            if parent is None:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            header = next(line["value"] for line in lines if line["key"] == "header")
            if header.get("parentCommit") and header["parentCommit"] != parent:
                return self.error(412, "PreconditionFailed", "parent commit is not the head of the branch")
            files = dict(repo["commits"][parent]["files"])
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = {
                        "oid": git_blob_oid(content),
                        "size": len(content),
                        "lfs": False,
                        "sha256": self.state.store(content),
                    }
                elif key == "lfsFile":
                    if not self.state.blob_path(value["oid"]).exists():
                        return self.error(400, "LfsNotUploaded", f"LFS object {value['oid']} was not uploaded")
                    pointer = (
                        f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\n"
                        f"size {value['size']}\n"
                    ).encode()
                    files[value["path"]] = {
                        "oid": git_blob_oid(pointer),
                        "size": value["size"],
                        "lfs": True,
                        "sha256": value["oid"],
                    }
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: m for p, m in files.items() if not p.startswith(prefix)}
            commit_id = hashlib.sha1(
                json.dumps(
                    [parent, header.get("summary"), sorted((p, m["oid"]) for p, m in files.items()), time.time_ns()]
                ).encode()
            ).hexdigest()
            repo["commits"][commit_id] = {"files": files, "parent": parent, "message": header.get("summary")}
            repo["branches"][revision] = commit_id
        return self.reply(
            200,
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self.base_url()}/datasets/{repo_id}/commit/{commit_id}",
            },
        )

    def resolve(self, repo_id: str, revision: str, path: str):
        repo = self.repo(repo_id)
        if repo is None:
            return
        found = self.state.files_at(repo, unquote(revision))
        if found is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        commit_id, files = found
        if path not in files:
            return self.error(404, "EntryNotFound", f"{path} does not exist at {revision}")
        meta = files[path]
        content = self.state.blob_path(meta["sha256"]).read_bytes()
        etag = meta["sha256"] if meta["lfs"] else meta["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit_id, "Accept-Ranges": "bytes"}
        if meta["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(meta["size"])})
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            start_text, _, end_text = byte_range[len("bytes=") :].partition("-")
            if start_text == "":
                start, end = max(0, len(content) - int(end_text)), len(content) - 1
            else:
                start, end = int(start_text), min(int(end_text) if end_text else len(content) - 1, len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return self.reply(206, content[start : end + 1], headers, "application/octet-stream")
        return self.reply(200, content, headers, "application/octet-stream")


class HubServer:
    """`with HubServer(tmp_path, {"hf_token": "alice"}) as hub:` serves on `hub.url` until the block ends."""

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.state = HubState(Path(root), tokens)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail_next(self, count: int):
        self.state.failures_left = count

    def fail_always(self):
        self.state.always_fail = True

    def recover(self):
        self.state.always_fail, self.state.failures_left = False, 0

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        _, files = self.state.files_at(repo, revision)
        return {p: self.state.blob_path(m["sha256"]).read_bytes() for p, m in files.items()}

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.state.repos[repo_id]["branches"][revision]
