#!/usr/bin/env bash
# The test command of the README and of CI: set up the venv if needed, then run the test suite.
#
#   bash scripts/test.sh [pytest arguments...]   # runs: python -m pytest -q -c tests/pytest.ini tests [arguments...]
# (tests/pytest.ini makes tests/ the rootdir: the repository root is the pack, imported only by path)
#
# An empty suite fails: pytest exits 5 when it collects no tests, and so does this script.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
status=0
"$venv/bin/python" -m pytest -q -c tests/pytest.ini tests "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
fi
exit "$status"
