"""Lints the VM tests' Python scripts the way the NixOS test driver does before booting:
pyflakes with the driver's names as builtins, and mypy with the driver's types
(driver_types.py) followed by one `<machine>: Machine` line per node.

usage: lint_scripts.py SCRIPTS.json OUT_DIR

SCRIPTS.json is the output of vm-tests/eval/test-scripts.nix. Each script is written to
OUT_DIR/<test>.py (and OUT_DIR/<test>.typed.py for mypy). Exits 1 if any test fails either.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

# The globals the driver defines for every script (besides one per machine).
DRIVER_SYMBOLS = [
    "start_all", "join_all", "subtest", "retry", "run_tests", "test_script", "machines",
    "vlans", "driver", "log", "create_machine", "serial_stdout_on", "serial_stdout_off",
    "polling_condition", "Machine", "t",
]


def python_name(machine: str) -> str:
    return machine.replace("-", "_")


def main() -> int:
    scripts = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    types = (Path(__file__).parent / "driver_types.py").read_text()
    if not scripts:
        print("  no test scripts found")
        return 1
    failed = 0
    for test, entry in sorted(scripts.items()):
        machines = [python_name(m) for m in entry["machines"]]
        plain = out / f"{test}.py"
        plain.write_text(entry["script"])
        env = dict(os.environ, PYFLAKES_BUILTINS=",".join(machines + DRIVER_SYMBOLS))
        flakes = subprocess.run(["pyflakes3", str(plain)], env=env, capture_output=True, text=True)
        if flakes.returncode != 0:
            failed += 1
            print(f"  {test}: pyflakes:\n" + (flakes.stdout + flakes.stderr).rstrip())
            continue
        typed = out / f"{test}.typed.py"
        header = types + "".join(f"{m}: Machine\n" for m in machines)
        typed.write_text(header + entry["script"])
        mypy = subprocess.run(
            [sys.executable, "-m", "mypy", "--no-implicit-optional", "--check-untyped-defs", "--no-error-summary",
             "--no-color-output", "--no-incremental", "--cache-dir=/dev/null", str(typed)],
            capture_output=True, text=True,
        )
        if mypy.returncode != 0:
            failed += 1
            offset = header.count("\n")
            print(f"  {test}: mypy (script lines are offset by {offset}):\n" + (mypy.stdout + mypy.stderr).rstrip())
            continue
        print(f"  {test}: pyflakes and mypy clean")
    print(f"  {len(scripts)} test scripts, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
