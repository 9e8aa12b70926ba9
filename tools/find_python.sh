#!/usr/bin/env bash
# Prints a command that runs a Python >= 3.12 (jax 0.11 needs it), or fails with a clear message.
# Order: $PYTHON, python3.12/3.13 on PATH, pyenv's 3.12 (its shim refuses a bare python3.12 when the
# global version is older), plain python3.
ok() { env $1 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for cand in ${PYTHON:+"$PYTHON"} python3.12 python3.13 "PYENV_VERSION=3.12.1 python3.12" python3; do
  if ok "$cand"; then echo "$cand"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' ); do
    if ok "PYENV_VERSION=$v python${v%.*}"; then echo "PYENV_VERSION=$v python${v%.*}"; exit 0; fi
  done
fi
echo "error: no Python >= 3.12 found (tried \$PYTHON, python3.12, python3.13, pyenv 3.12.x, python3); set PYTHON=/path/to/python3.12" >&2
exit 1
