#!/usr/bin/env bash
# The GPU check, in one go (< 8 min on one H100/H200): the cuda-marked tests, then tools/gpu_check.py (SD 1.5-size
# bf16 training step at 512 px vs the reference loop with peak VRAM and MFU, CMLoRA vs Composite at N = 4, the
# multi-GPU line). Prints JSON lines; exit status 0 when every part passed.
#
#   tools/gpu_check.sh             # on a GPU machine, from the repository root or anywhere
#   tools/gpu_check.sh --dry-run   # on the CPU: collects the cuda tests, runs gpu_check.py --dry-run (tiny, 32 px)
#
# Installs nothing from the network. Packages the GPU image lacks (diffusers, omegaconf) are installed from wheels
# carried in .whl/ (docs/performance.md says how to fetch them) into /tmp/lorakit_site.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
start=$(date +%s)
if ! $PY -c "import diffusers, omegaconf" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lorakit_site .whl/*.whl >&2 \
      || { echo '{"check": "setup", "error": "pip install of .whl/*.whl failed"}'; exit 2; }
    export PYTHONPATH=/tmp/lorakit_site
  else
    echo '{"check": "setup", "error": "diffusers / omegaconf missing and no .whl/ wheels carried (docs/performance.md)"}'
    exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# GPU_CHECK_LOGS=DIR keeps the pytest log, junit XML and gpu_check.py's stderr there (else a temporary folder);
# GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_TIMEOUT (seconds) fit both parts into a shorter lease.
if [ -n "${GPU_CHECK_LOGS:-}" ]; then
  tmp=$GPU_CHECK_LOGS; mkdir -p "$tmp"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
fi

# 1. The cuda-marked tests (on the CPU: only collected, they would all skip).
t0=$(date +%s)
if [ $DRY = 1 ]; then
  $PY -m pytest -q -m cuda tests/test_cuda.py --collect-only -p no:cacheprovider > "$tmp/pytest.log" 2>&1
else
  timeout "${GPU_CHECK_TEST_TIMEOUT:-300}" $PY -m pytest -q -m cuda tests/ -p no:cacheprovider --junitxml="$tmp/junit.xml" > "$tmp/pytest.log" 2>&1
fi
rc_tests=$?
$PY - "$tmp" "$rc_tests" "$(( $(date +%s) - t0 ))" "$DRY" <<'PY'
import json, sys
from pathlib import Path
tmp, rc, secs, dry = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
row = {"check": "cuda_tests", "rc": rc, "seconds": secs}
log = (tmp / "pytest.log").read_text()
if dry:
    # pytest -q --collect-only prints "tests/test_cuda.py: 7" per file
    row["collected"] = sum(int(line.rsplit(": ", 1)[1]) for line in log.splitlines()
                           if line.startswith("tests/") and line.rsplit(": ", 1)[-1].isdigit())
elif (tmp / "junit.xml").exists():
    import xml.etree.ElementTree as ET
    suite = ET.parse(tmp / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    row.update(passed=n - f - e - s, failed=f, errors=e, skipped=s)
    row["failures"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None][:10]
    row["skips"] = sorted({(c.find("skipped").get("message") or "")[:120] for c in suite.iter("testcase")
                           if c.find("skipped") is not None})[:10]
if rc not in (0, 5):
    row["log_tail"] = log[-1500:]
print(json.dumps(row), flush=True)
PY

# 2. The measurements.
if [ $DRY = 1 ]; then
  timeout 420 $PY tools/gpu_check.py --dry-run 2> "$tmp/check.err"
else
  timeout "${GPU_CHECK_TIMEOUT:-420}" $PY tools/gpu_check.py 2> "$tmp/check.err"
fi
rc_check=$?
[ $rc_check -ne 0 ] && $PY -c 'import json,sys; print(json.dumps({"check": "gpu_check.py", "rc": int(sys.argv[1]), "stderr_tail": open(sys.argv[2]).read()[-1500:]}))' "$rc_check" "$tmp/check.err"
echo "{\"check\": \"total\", \"seconds\": $(( $(date +%s) - start )), \"dry_run\": $([ $DRY = 1 ] && echo true || echo false)}"
[ $rc_tests -eq 0 ] || [ $DRY = 1 ] && [ $rc_check -eq 0 ]
