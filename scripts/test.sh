#!/usr/bin/env bash
# The test command of the README and of CI: set up the venv if needed, then run the test suite.
#
#   bash scripts/test.sh [pytest arguments...]   # runs: python -m pytest -q -c tests/pytest.ini tests [arguments...]
# (tests/pytest.ini makes tests/ the rootdir: the repository root is the pack, imported only by path)
#
# AD_PYTHON names another interpreter to run it with instead of the venv's, for example a full ComfyUI's
# own Python together with COMFYUI_PATH (as CI runs the suite against ComfyUI v0.3.64).
# An empty suite fails: pytest exits 5 when it collects no tests, and so does this script.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${AD_PYTHON:-}" ]]; then
    python="$AD_PYTHON"
else
    python="$(bash "$root/scripts/setup_env.sh")/bin/python"
fi
cd "$root"
status=0
"$python" -m pytest -q -c tests/pytest.ini tests "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
fi
exit "$status"
