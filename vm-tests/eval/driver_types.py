# Type declarations of what the NixOS test driver (nixpkgs nixos/lib/test-driver) gives a
# test script: the Machine methods the scripts here use, with the driver's signatures, and
# the driver's global functions. vm-tests/eval/lint_scripts.py puts this in front of each
# script and runs mypy on the result, as the driver does before it boots anything.
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple


class Machine:
    name: str

    def start(self, allow_reboot: bool = False) -> None:
        raise NotImplementedError
    def shutdown(self) -> None:
        raise NotImplementedError
    def crash(self) -> None:
        raise NotImplementedError
    def reboot(self) -> None:
        raise NotImplementedError
    def block(self) -> None:
        raise NotImplementedError
    def unblock(self) -> None:
        raise NotImplementedError
    def log(self, msg: str) -> None:
        raise NotImplementedError
    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Optional[int] = 900,
    ) -> Tuple[int, str]:
        raise NotImplementedError
    def succeed(self, *commands: str, timeout: Optional[int] = None) -> str:
        raise NotImplementedError
    def fail(self, *commands: str, timeout: Optional[int] = None) -> str:
        raise NotImplementedError
    def wait_until_succeeds(self, command: str, timeout: int = 900) -> str:
        raise NotImplementedError
    def wait_until_fails(self, command: str, timeout: int = 900) -> str:
        raise NotImplementedError
    def wait_for_unit(self, unit: str, user: Optional[str] = None, timeout: int = 900) -> None:
        raise NotImplementedError
    def wait_for_file(self, filename: str, timeout: int = 900) -> None:
        raise NotImplementedError
    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        raise NotImplementedError
    def wait_for_closed_port(self, port: int, addr: str = "localhost", timeout: int = 900) -> None:
        raise NotImplementedError
    def wait_for_open_unix_socket(self, addr: str, is_datagram: bool = False, timeout: int = 900) -> None:
        raise NotImplementedError
    def wait_for_console_text(self, regex: str, timeout: Optional[int] = None) -> None:
        raise NotImplementedError
    def systemctl(self, q: str, user: Optional[str] = None) -> Tuple[int, str]:
        raise NotImplementedError
    def get_unit_info(self, unit: str, user: Optional[str] = None) -> Dict[str, str]:
        raise NotImplementedError
    def get_unit_property(self, unit: str, property: str, user: Optional[str] = None) -> str:
        raise NotImplementedError
    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        raise NotImplementedError
    def start_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        raise NotImplementedError
    def stop_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        raise NotImplementedError
    def copy_from_host(self, source: str, target: str) -> None:
        raise NotImplementedError
    def copy_from_vm(self, source: str, target_dir: str = "") -> None:
        raise NotImplementedError
    def sleep(self, secs: int) -> None:
        raise NotImplementedError
    def send_chars(self, chars: str, delay: Optional[float] = 0.01) -> None:
        raise NotImplementedError
    def send_key(self, key: str, delay: Optional[float] = 0.01, log: Optional[bool] = True) -> None:
        raise NotImplementedError


start_all: Callable[[], None]
join_all: Callable[[], None]
subtest: Callable[[str], ContextManager[None]]
retry: Callable[..., None]
run_tests: Callable[[], None]
serial_stdout_on: Callable[[], None]
serial_stdout_off: Callable[[], None]
polling_condition: Callable[..., Any]
machines: List[Machine]
driver: Any
log: Any
