"""A validating front for Triton's HTTP port: `python -m client.http_guard --upstream URL`.

Triton's own HTTP frontend mis-handles some JSON bodies (a crash on deep nesting, HTTP 500
for malformed JSON or a wrong JSON type, silent wrapping of integers too big for the input's
type; README "Errors" says which releases fix which). The guard reads each request body up to
a bound, checks it (checks.py) and passes everything else through unchanged (proxy.py);
docker/compose*.yaml put it on the HTTP port.
"""
