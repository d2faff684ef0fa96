#!/usr/bin/env bash
# CPU leg (GitHub-hosted runner): the repository's own CI entry, .ci/run (set-up, lint, test suite), then the
# conformance suite on the cpu platform with its report in $LEG_REPORT_DIR. Both always run; the leg fails if
# either does.
set -euo pipefail
cd "$(dirname "$0")/../.."
report_dir=${LEG_REPORT_DIR:-conformance-report/cpu}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

status=0
bash .ci/run || status=$?
mkdir -p "$report_dir"
# .ci/run builds the project venv; without it there is nothing to run the conformance suite with.
if [ -x .venv/bin/portable-rl ]; then
    .venv/bin/portable-rl conformance --platform cpu --fail-on-unexpected-skip --report "$report_dir" || status=$?
else
    echo "cpu leg: .venv/bin/portable-rl missing after .ci/run; conformance not run" >&2
    status=1
fi
exit "$status"
