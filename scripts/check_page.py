#!/usr/bin/env python3
"""Load a page in headless Chromium, wait until its scripts say they are done, screenshot it,
and report script errors — through the DevTools protocol over a pipe (no Python packages).

    python3 scripts/check_page.py URL SCREENSHOT.png [DONE_JS] [TIMEOUT_S]

DONE_JS is a JavaScript expression that becomes true when the page has finished (default:
`document.readyState == "complete"`). Prints one JSON object: {"dom": outer HTML, "errors":
[uncaught exceptions and console errors]}. Exits 1 on a timeout or any error, 2 when no
Chromium is found. Used by tests/cli/pages.rs.
"""
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time

url, png = sys.argv[1], sys.argv[2]
done_js = sys.argv[3] if len(sys.argv) > 3 else 'document.readyState == "complete"'
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
if browser is None:
    print("no Chromium found", file=sys.stderr)
    sys.exit(2)

# --remote-debugging-pipe: the browser reads commands from fd 3 and writes replies to fd 4,
# each a JSON message ended by a NUL byte.
to_chrome_r, to_chrome_w = os.pipe()
from_chrome_r, from_chrome_w = os.pipe()


def child_fds():
    os.dup2(to_chrome_r, 3)
    os.dup2(from_chrome_w, 4)


proc = subprocess.Popen(
    [browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
     "--window-size=1280,900", "--no-first-run", "about:blank"],
    preexec_fn=child_fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(to_chrome_r)
os.close(from_chrome_w)
buf = b""
next_id = 0
errors = []
deadline = time.time() + timeout


def send(method, params=None, session=None):
    global next_id
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    os.write(to_chrome_w, json.dumps(msg).encode() + b"\0")
    return next_id


def read_message():
    global buf
    while b"\0" not in buf:
        left = deadline - time.time()
        if left <= 0 or not select.select([from_chrome_r], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(from_chrome_r, 1 << 20)
        if not chunk:
            raise EOFError("the browser closed the pipe")
        buf += chunk
    raw, buf = buf.split(b"\0", 1)
    return json.loads(raw)


def call(method, params=None, session=None):
    want = send(method, params, session)
    while True:
        m = read_message()
        if m.get("method") == "Runtime.exceptionThrown":
            d = m["params"]["exceptionDetails"]
            errors.append(d.get("exception", {}).get("description") or d.get("text"))
        elif m.get("method") == "Runtime.consoleAPICalled" and m["params"]["type"] == "error":
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in m["params"]["args"]))
        if m.get("id") == want:
            if "error" in m:
                raise RuntimeError(f"{method}: {m['error']}")
            return m.get("result", {})


def evaluate(expr, session):
    r = call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
    return r.get("result", {}).get("value")


status = 0
try:
    target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    call("Runtime.enable", session=session)
    call("Page.enable", session=session)
    call("Page.navigate", {"url": url}, session)
    while not evaluate(f"!!({done_js})", session):
        time.sleep(0.2)
    shot = call("Page.captureScreenshot", {"format": "png"}, session)
    with open(png, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    dom = evaluate("document.documentElement.outerHTML", session)
except TimeoutError:
    dom, status = None, 1
    errors.append(f"timed out after {timeout:.0f} s waiting for: {done_js}")
finally:
    proc.kill()
    proc.wait()
print(json.dumps({"dom": dom, "errors": errors}))
sys.exit(1 if errors else status)
