#!/usr/bin/env python3
"""Container health check (Dockerfile HEALTHCHECK, compose healthcheck): exit 0 when the
server in this container answers 200 on /v2/health/ready (every model loaded and ready)."""

import os
import sys
import urllib.request

URL = f"http://127.0.0.1:{os.environ.get('HTTP_PORT', '8000')}/v2/health/ready"

try:
    with urllib.request.urlopen(URL, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # connection refused, 400 (not ready), timeout
    print(f"{URL}: {exc}", file=sys.stderr)
    sys.exit(1)
