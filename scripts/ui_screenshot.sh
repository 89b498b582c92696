#!/usr/bin/env bash
# Screenshot a deployment's "Run > Custom run" parameter form with headless Chromium.
#   scripts/ui_screenshot.sh collect-and-enhance/know-pipeline docs/ui-deployment-form.png
#
# Run it with the venv active and PREFECT_API_URL exported. Under basic auth export
# PREFECT_API_AUTH_STRING='user:pass' too (the server's PREFECT_SERVER_API_AUTH_STRING): the
# UI's login page takes that whole string in its one field and keeps it, base64-encoded, in
# the page's local storage (key prefect-password). A headless browser cannot type it, so the
# script stores it there itself before the UI loads, over Chromium's DevTools protocol
# (loopback only), then takes the screenshot the same way. CHROMIUM picks the binary.
set -euo pipefail
: "${PREFECT_API_URL:?export PREFECT_API_URL=http://127.0.0.1:4200/api first}"
deployment=${1:-collect-and-enhance/know-pipeline}
out=$(realpath -m "${2:-docs/ui-deployment-form.png}")
chromium=${CHROMIUM:-chromium}
id=$(prefect deployment inspect "$deployment" | grep -m1 "'id'" | grep -oE '[0-9a-f-]{36}')
ui=${PREFECT_API_URL%/api}
url="$ui/deployments/deployment/$id/run"
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1800
       --run-all-compositor-stages-before-draw)

if [[ -z "${PREFECT_API_AUTH_STRING:-}" ]]; then
  "$chromium" "${flags[@]}" --virtual-time-budget=15000 --screenshot="$out" "$url"
  exit 0
fi

python - "$chromium" "$url" "$out" "${flags[@]}" <<'PY'
"""Headless Chromium over the DevTools protocol: local storage first, then the page, then a PNG."""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from websockets.sync.client import connect

chromium, url, out, *flags = sys.argv[1:]
token = base64.b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()
with tempfile.TemporaryDirectory() as profile:
    browser = subprocess.Popen([chromium, *flags, "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if browser.poll() is not None or time.time() > deadline:
                sys.exit(f"error: {chromium} did not start its DevTools endpoint")
            time.sleep(0.2)
        port = open(port_file).read().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p.get("type") == "page")
        with connect(ws_url, max_size=None) as ws:
            counter = 0

            def call(method, **params):
                global counter
                counter += 1
                ws.send(json.dumps({"id": counter, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("id") == counter:
                        if "error" in msg:
                            sys.exit(f"error: {method}: {msg['error']}")
                        return msg.get("result", {})

            call("Page.enable")
            call("Page.addScriptToEvaluateOnNewDocument",
                 source=f"try {{ localStorage.setItem('prefect-password', {json.dumps(token)}) }} catch (e) {{}}")
            call("Emulation.setDeviceMetricsOverride", width=1400, height=1800, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            time.sleep(15)  # the UI loads the deployment and renders the form (what --virtual-time-budget allows)
            shot = call("Page.captureScreenshot", format="png")
        with open(out, "wb") as fh:
            fh.write(base64.b64decode(shot["data"]))
        print(f"wrote {out}")
    finally:
        browser.terminate()
        browser.wait(20)
PY
